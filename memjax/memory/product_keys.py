"""Product-key top-k: exact top-k over n*n slots at O(n) cost per head.

Shapes (``...`` is any leading batch shape, e.g. [B, T]):
  query   [..., H, Dk]        one query per head
  keys    [H, 2, n, Dk/2]     per head, two sets of n sub-keys (first half, second half)
  scores  [..., H, k]         sorted descending
  indices [..., H, k] int32   slot = i * n + j (i: row of keys[h, 0], j: row of keys[h, 1])

The score of slot (i, j) is <q1, K1_i> + <q2, K2_j>. The exact top-k of all n^2 sums lies in
the k x k grid of (top-k of s1) x (top-k of s2): any slot outside it is beaten by at least k
slots inside it. So: two top-k over n, k^2 candidate sums, one top-k over k^2.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels import cpu
from memjax.kernels.topk import pick, product_topk_from_scores


def _check_topk_args(query, keys, k: int) -> tuple[int, int, int]:
  if keys.ndim != 4 or keys.shape[1] != 2:
    raise ValueError(f"keys must have shape [H, 2, n, Dk // 2], got keys.shape={keys.shape}")
  heads, _, n, half = keys.shape
  if query.ndim < 2:
    raise ValueError(f"query must have shape [..., H, Dk], got query.shape={query.shape}")
  if query.shape[-1] % 2:
    raise ValueError(f"query's last dim Dk={query.shape[-1]} must be even (query.shape={query.shape})")
  if query.shape[-2] != heads:
    raise ValueError(
        f"query has H={query.shape[-2]} heads but keys has {heads} (query.shape={query.shape}, "
        f"keys.shape={keys.shape})")
  if query.shape[-1] != 2 * half:
    raise ValueError(
        f"query's Dk={query.shape[-1]} must equal 2 * keys.shape[-1] = {2 * half} "
        f"(query.shape={query.shape}, keys.shape={keys.shape})")
  if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
    raise ValueError(f"k={k!r} must be a positive int")
  if k > n:
    raise ValueError(f"k={k} must be <= n={n} (keys.shape={keys.shape}): each half contributes its top-k")
  if n * n > 2**31 - 1:
    raise ValueError(f"n={n} gives n*n slots, beyond int32 indices")
  return heads, n, half


def subkey_scores_head_major(query_xHxK, keys_Hx2xNxK2):
  """Scores of each query half against its sub-keys, head-major: ([H, N, n], [H, N, n]) in fp32,
  N the product of the leading dims. A plain batched matmul ([H, N, Dk/2] x [H, n, Dk/2]) whose
  output needs no transpose: on CPU the selection takes its rows in this order (see
  ``product_key_topk``)."""
  half = keys_Hx2xNxK2.shape[-1]
  heads = query_xHxK.shape[-2]
  q_HxNxK = jnp.moveaxis(query_xHxK.reshape(-1, heads, 2 * half), 1, 0)  # [H, N, Dk]

  def half_scores(q_half, keys_half):
    return jnp.einsum("htd,hnd->htn", q_half, keys_half, preferred_element_type=jnp.float32)  # [H, N, n]

  return half_scores(q_HxNxK[..., :half], keys_Hx2xNxK2[:, 0]), half_scores(q_HxNxK[..., half:], keys_Hx2xNxK2[:, 1])


def _token_major(x_HxNxm, lead):
  """[H, N, m] -> [..., H, m] (``lead`` the query's leading shape)."""
  return jnp.moveaxis(x_HxNxm, 0, 1).reshape(*lead, x_HxNxm.shape[0], x_HxNxm.shape[-1])


def _head_major(x_xHxm):
  """[..., H, m] -> [H, N, m]."""
  return jnp.moveaxis(x_xHxm.reshape(-1, *x_xHxm.shape[-2:]), 1, 0)


def subkey_scores(query_xHxK, keys_Hx2xNxK2):
  """Scores of each query half against its sub-keys: ([..., H, n], [..., H, n]) in fp32.

  Computed head-major ([H, tokens, Dk/2] x [H, n, Dk/2]), a plain batched matmul: on CPU about
  twice as fast as contracting with the head axis in the middle.
  """
  lead = query_xHxK.shape[:-2]
  s1, s2 = subkey_scores_head_major(query_xHxK, keys_Hx2xNxK2)
  return _token_major(s1, lead), _token_major(s2, lead)


def _selected_scores(query_xHxK, keys_Hx2xNxK2, i_xHxk, j_xHxk):
  """<q1, K1[i]> + <q2, K2[j]> from gathered sub-keys: O(k Dk) per head, differentiable."""
  half = keys_Hx2xNxK2.shape[-1]
  heads = keys_Hx2xNxK2.shape[0]
  h_idx = jnp.arange(heads).reshape((1,) * (i_xHxk.ndim - 2) + (heads, 1))
  k1 = keys_Hx2xNxK2[:, 0][h_idx, i_xHxk]  # [..., H, k, Dk/2]
  k2 = keys_Hx2xNxK2[:, 1][h_idx, j_xHxk]
  q1, q2 = query_xHxK[..., :half], query_xHxK[..., half:]
  return (jnp.einsum("...hd,...hkd->...hk", q1, k1, preferred_element_type=jnp.float32)
          + jnp.einsum("...hd,...hkd->...hk", q2, k2, preferred_element_type=jnp.float32))


DENSE_PICK_MAX_N_OVER_K = 16
_XLA_GATHERED_ON_CPU = [False]  # set by gathered_xla_gradient()


@contextlib.contextmanager
def gathered_xla_gradient():
  """While tracing inside it, ``backend="xla"`` differentiates through the gathered sub-keys on CPU
  too (GPU's formulation), not the dense-score picks, and without a platform branch: for
  ``memjax.plan.compare_with_xla``, whose CPU compile stands for what the GPU compiler gets, and for
  tests that count the formulation's matmuls in a jaxpr.

  Example:
    >>> with gathered_xla_gradient():
    ...   _ = jax.grad(lambda q: product_key_topk(q, jnp.ones((1, 2, 4, 2)), 2, backend="xla")[0].sum())(
    ...       jnp.ones((3, 1, 4)))
  """
  previous = _XLA_GATHERED_ON_CPU[0]
  _XLA_GATHERED_ON_CPU[0] = True
  try:
    yield
  finally:
    _XLA_GATHERED_ON_CPU[0] = previous


def _picked_scores(query_xHxK, keys_Hx2xNxK2, i_xHxk, j_xHxk):
  """``_selected_scores`` from the dense scores by one-hot picks: no gather (the TPU formulation)."""
  s1, s2 = subkey_scores(query_xHxK, keys_Hx2xNxK2)
  return pick(s1, i_xHxk) + pick(s2, j_xHxk)


def product_key_topk(query, keys, k: int, *, backend: str = "auto"):
  """Exact top-k slots of a product-key memory, per head.

  Args:
    query: [..., H, Dk] queries (any float dtype).
    keys: [H, 2, n, Dk // 2] sub-keys: ``keys[h, 0]`` scores the first half of head h's query,
      ``keys[h, 1]`` the second.
    k: slots per head, ``1 <= k <= n``.
    backend: the selection's backend (``memjax.kernels.topk``): "auto" (the C++ kernel when lowered
      for CPU, a gather-free formulation for TPU, XLA elsewhere), "xla", "cpu" or "approx". The
      exact ones return the same slots and scores.

  Returns:
    ``(scores, indices)``: scores [..., H, k] fp32 sorted descending, indices [..., H, k] int32
    with ``index = i * n + j``. Equal to the top-k of all n*n sums ``s1[i] + s2[j]``. Ties are
    broken by position (lower flat candidate first), as ``jax.lax.top_k`` does.
    Differentiable in ``query`` and ``keys`` through the scores.

  Raises:
    ValueError: k > n, odd Dk, shapes of ``query`` and ``keys`` that do not match, or an unknown backend.

  Example:
    >>> q = jnp.ones((5, 2, 8)); keys = jnp.zeros((2, 2, 16, 4))
    >>> scores, idx = product_key_topk(q, keys, 4)
    >>> scores.shape, idx.shape
    ((5, 2, 4), (5, 2, 4))
  """
  _, n, _ = _check_topk_args(query, keys, k)
  # Selection (no gradient): all n sub-key scores per half, then the k x k candidate grid
  # (kernels/topk.py: the C++ kernel where lowered for CPU, three jax.lax.top_k elsewhere).
  # Rows are independent, so the selection runs on the scores head-major, as the matmul writes them:
  # only its [H, N, k] results are transposed, not the [H, N, n] scores (on CPU at 2048 tokens x 2
  # heads, n 256, k 32 that transpose cost as much as a third of the selection).
  s1, s2 = subkey_scores_head_major(jax.lax.stop_gradient(query), jax.lax.stop_gradient(keys))  # [H, N, n]
  selected = product_topk_from_scores(s1, s2, k, backend=backend)  # [H, N, k] each
  lead = query.shape[:-2]
  scores, i, j = (_token_major(x, lead) for x in selected)  # [..., H, k]
  indices = (i * n + j).astype(jnp.int32)
  # Gradient: only the k chosen slots' scores depend on the parameters. How it is formed (the same
  # gradient, different cost per platform):
  #  gathered: a recomputation of the k chosen scores from the chosen sub-keys' rows, O(k Dk) per
  #            head; the reference, and XLA GPU's.
  #  dense:    the scores' cotangent scattered into the dense [H, N, n] sub-key scores (already
  #            computed for the selection), an O(n Dk) matmul backward and no forward work at all
  #            (a custom VJP); on CPU while n <= DENSE_PICK_MAX_N_OVER_K * k (2048 tokens x 2 heads,
  #            n 256, k 32: forward 28 -> 2 ms, with gradient 37 -> 14 ms against gathered), for
  #            every backend: the scatter is the C++ kernel, or XLA's under backend="xla" (the same
  #            bits), so on CPU the backends differ only in the selection, which is exact, and train
  #            bit for bit alike.
  #  picked:   a recomputation by one-hot picks of the dense scores, no gather or scatter at all: TPU
  #            (compiled for v5p, 16k tokens x 4 heads, n 1024, k 32: forward + backward estimate
  #            13 -> 5.7 ms).
  def recomputed(chosen_fn):
    def fn(query, keys):
      chosen = chosen_fn(query, keys, i, j)
      return scores + (chosen - jax.lax.stop_gradient(chosen))
    return fn

  def dense(kernel: bool):
    def fn(query, keys):
      s1, s2 = subkey_scores_head_major(query, keys)
      return _token_major(_dense_score_grad(n, kernel, s1, s2, *selected), lead)
    return fn

  dense_on_cpu = n <= DENSE_PICK_MAX_N_OVER_K * k
  if backend == "xla":
    if not dense_on_cpu or _XLA_GATHERED_ON_CPU[0]:
      return recomputed(_selected_scores)(query, keys), indices
    scores = jax.lax.platform_dependent(query, keys, cpu=dense(kernel=False), default=recomputed(_selected_scores))
    return scores, indices
  on_cpu = dense(kernel=True) if dense_on_cpu else recomputed(_selected_scores)
  if backend == "cpu":
    return on_cpu(query, keys), indices
  scores = jax.lax.platform_dependent(query, keys, cpu=on_cpu, tpu=recomputed(_picked_scores),
                                      default=recomputed(_selected_scores))
  return scores, indices


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense_score_grad(n: int, kernel: bool, s1_HxNxn, s2_HxNxn, scores_HxNxk, i_HxNxk, j_HxNxk):
  """``scores`` (the selection's exact sums, no further work), differentiable as the entries
  ``s1[i] + s2[j]`` of the dense sub-key scores: the cotangent is scattered into them (by the C++
  kernel if ``kernel``, else by XLA: the same bits)."""
  del n, kernel, s1_HxNxn, s2_HxNxn, i_HxNxk, j_HxNxk
  return scores_HxNxk


def _dense_score_grad_fwd(n, kernel, s1, s2, scores, i, j):
  del n, kernel, s1, s2
  return scores, (i, j)


def _dense_score_grad_bwd(n, kernel, res, d_scores_HxNxk):
  i, j = res
  zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  scatter = cpu.scatter_rows if kernel else cpu.scatter_rows_xla  # [H, N, k] -> [H, N, n]
  return (scatter(i, d_scores_HxNxk, n), scatter(j, d_scores_HxNxk, n),
          jnp.zeros_like(d_scores_HxNxk), zero_int(i), zero_int(j))


_dense_score_grad.defvjp(_dense_score_grad_fwd, _dense_score_grad_bwd)


def product_key_topk_reference(query, keys, k: int):
  """Brute force over all n*n slots (O(n^2) memory): the oracle for tests and notebooks."""
  _, n, _ = _check_topk_args(query, keys, k)
  s1, s2 = subkey_scores(query, keys)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)  # [..., H, n*n]
  scores, indices = jax.lax.top_k(full, k)
  return scores, indices.astype(jnp.int32)
