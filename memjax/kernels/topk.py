"""The selection step of the product-key top-k, from the two halves' sub-key scores.

Shapes (``...`` is any leading shape, e.g. [B, T, H]):
  s1, s2   [..., n]  fp32   scores of the query halves against their n sub-keys (``subkey_scores``)
  scores   [..., k]  fp32   sorted descending
  i, j     [..., k]  int32  the chosen sub-keys of each half: slot = i * n + j

``product_topk_xla`` is the plain-jnp formulation (three ``jax.lax.top_k``): top-k of each half,
the k x k grid ``cand[a * k + b] = top1[a] + top2[b]`` (fp32 sums), top-k of the grid. The C++
kernel ``memjax_product_topk`` (cpu_ffi.cc) returns the same three arrays bit for bit:
  * order: XLA's TopK total order on fp32, -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN (NaNs
    ordered by their bit patterns); so +0 ranks above -0 and a +NaN score above everything;
  * ties: the lower position first, in a half the position in s (lower sub-key index), in the grid
    a * k + b (a, b: ranks within the halves' top-k);
  * scores are the fp32 sums top1[a] + top2[b]; inf + -inf gives the hardware's default NaN (x86:
    -NaN, which ranks last). One caveat: a sum of two different NaNs takes the first operand's (s1's),
    the x86 and ARM rule and what jitted XLA gives here, but XLA is not consistent about it (run
    eagerly, its broadcast add returned the second operand's), so only in rows whose top-k hold
    two different NaNs can the kernel and an XLA run disagree on which NaN comes first.
The kernel is O(n) per half (one histogram of the keys' top bits cuts the row to ~k candidates,
ranked exactly) plus O(k log k) for the grid (a best-first walk over its frontier, valid because
fp32 sums of finite sorted values are monotone); rows whose selected values hold an inf or NaN rank
all k^2 sums instead. Rows are split over XLA's CPU thread pool.

Backends: ``xla`` (the reference), ``cpu`` (the kernel when it is built, cpu.py; else ``xla``),
``approx`` (``product_topk_approx``) and ``auto``: the kernel on CPU, the gather-free formulation
(``product_topk_gather_free``, same arrays) on TPU, ``xla`` elsewhere, decided by the platform the computation is lowered
for (``jax.lax.platform_dependent``: lowered for one platform, only that branch is emitted), so a
jitted function compiled for TPU or GPU never holds the CPU custom call, whatever
``jax.default_backend()`` says. ``auto`` and ``cpu`` build the C++ library on first use (once per
machine, cached; ``MEMJAX_CPU_FFI=0`` skips it). No gradient: the selection is discrete (callers
recompute scores from i, j).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels import cpu

BACKENDS = ("auto", "xla", "cpu", "approx")
APPROX_RECALL = 0.95  # recall target of each half's jax.lax.approx_max_k under backend="approx"
_FFI_MAX_K = 2**16  # the kernel packs grid positions as a << 16 | b


def _check(s1, s2, k: int, backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"product top-k backend={backend!r} is unknown; allowed: {list(BACKENDS)}")
  if s1.shape != s2.shape or s1.ndim < 1:
    raise ValueError(f"s1 and s2 must have the same shape [..., n], got {s1.shape=} and {s2.shape=}")
  n = s1.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k={k!r} must be an int in [1, n={n}] (s1.shape={s1.shape})")


def _grid_topk(top1, i1, top2, i2, k: int):
  """The k x k candidate stage from each half's sorted top-k: (scores, i, j), each [..., k]."""
  cand = top1[..., :, None] + top2[..., None, :]  # [..., k, k]
  cand = cand.reshape(*cand.shape[:-2], k * k)  # [..., k*k]
  scores, flat = jax.lax.top_k(cand, k)  # [..., k]
  i = jnp.take_along_axis(i1, flat // k, axis=-1)
  j = jnp.take_along_axis(i2, flat % k, axis=-1)
  return scores, i.astype(jnp.int32), j.astype(jnp.int32)


def pick(x, idx):
  """``take_along_axis(x, idx, -1)`` without a gather: ``x`` [..., m], ``idx`` [..., k] -> [..., k].

  A one-hot compare-and-sum over m (k*m elementwise work). On TPU gathers along a minor axis are
  slow: compiled for v5p (16k tokens x 4 heads, n 1024, k 32), the candidate stage's two index
  gathers cost ~30 ms in the compiler's estimate, this ~0.7 ms (benchmarks/topk_compile.py).
  Exact (one term is selected; the others are zeros); differentiable in ``x``.
  """
  positions = jnp.arange(x.shape[-1], dtype=idx.dtype).reshape((1,) * idx.ndim + (x.shape[-1],))
  hit = idx[..., :, None] == positions  # [..., k, m]
  return jnp.sum(jnp.where(hit, x[..., None, :], jnp.zeros((), x.dtype)), axis=-1)


def _grid_topk_gather_free(top1, i1, top2, i2, k: int):
  """``_grid_topk`` with the index look-ups as one-hot picks (``pick``): the same arrays."""
  cand = (top1[..., :, None] + top2[..., None, :]).reshape(*top1.shape[:-1], k * k)
  scores, flat = jax.lax.top_k(cand, k)
  i = pick(i1, (flat // k).astype(i1.dtype))
  j = pick(i2, (flat % k).astype(i2.dtype))
  return scores, i.astype(jnp.int32), j.astype(jnp.int32)


def product_topk_gather_free(s1, s2, k: int):
  """``product_topk_xla`` with the grid's index look-ups as one-hot picks (``pick``): the same
  arrays, the formulation the TPU compiler handles well (``auto`` takes it when lowered for TPU)."""
  top1, i1 = jax.lax.top_k(s1, k)
  top2, i2 = jax.lax.top_k(s2, k)
  return _grid_topk_gather_free(top1, i1, top2, i2, k)


def product_topk_xla(s1, s2, k: int):
  """The plain-jnp selection: (scores, i, j), each [..., k]; the reference for the kernel."""
  top1, i1 = jax.lax.top_k(s1, k)  # [..., k]
  top2, i2 = jax.lax.top_k(s2, k)  # [..., k]
  return _grid_topk(top1, i1, top2, i2, k)


def product_topk_approx(s1, s2, k: int, recall_target: float = APPROX_RECALL):
  """Each half's top-k by ``jax.lax.approx_max_k`` (TPU: a partial reduction with ``recall_target``;
  other compilers: exact), then the exact k x k candidate stage (gather-free). Scores are exact sums
  of the candidates found; a slot is missed only when one of its halves is. Compiled for v5p at 16k
  tokens x 4 heads, n 1024, k 32, the compiler prices it like the exact ``auto`` (the halves' top-k
  are not the cost there), so ``auto`` stays the default everywhere."""
  top1, i1 = jax.lax.approx_max_k(s1, k, recall_target=recall_target)  # [..., k]
  top2, i2 = jax.lax.approx_max_k(s2, k, recall_target=recall_target)
  return _grid_topk_gather_free(top1, i1, top2, i2, k)


def _product_topk_ffi(s1, s2, k: int):
  out = s1.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
      "memjax_product_topk",
      (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32),
       jax.ShapeDtypeStruct(out, jnp.int32)),
      # Rows are independent and the kernel takes any leading shape, so a vmapped call is one call
      # on operands broadcast to the batch shape.
      vmap_method="broadcast_all")
  # Inside shard_map with check_vma, the results vary over the mesh axes the operands vary over.
  axes = tuple(sorted(jax.typeof(s1).manual_axis_type.varying | jax.typeof(s2).manual_axis_type.varying))
  if not axes:
    return call(s1, s2, k=k)
  s1, s2 = (_varying(x, axes) for x in (s1, s2))
  return tuple(jax.lax.pcast(x, axes, to="varying") for x in call(s1, s2, k=k))


def _varying(x, axes):
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def product_topk_from_scores(s1, s2, k: int, *, backend: str = "auto"):
  """Exact top-k of the n*n sums ``s1[..., i] + s2[..., j]`` via the k x k candidate grid.

  Args:
    s1, s2: [..., n] sub-key scores of the two query halves (cast to fp32).
    k: ``1 <= k <= n``, static.
    backend: "auto" (the C++ kernel where the computation is lowered for CPU, else XLA), "xla",
      "cpu" (the kernel on any platform it is lowered for: CPU only; XLA if it is not built), or
      "approx" (``product_topk_approx``: approximate per-half top-k on TPU, exact elsewhere).

  Returns:
    ``(scores, i, j)``: scores [..., k] fp32 sorted descending, i, j [..., k] int32 with
    ``scores[t] = s1[i[t]] + s2[j[t]]`` (fp32), without gradient. Ties and NaN order as in the
    module docstring; the exact backends return identical arrays.

  Raises:
    ValueError: an unknown backend, shapes of s1 and s2 that differ, or k outside [1, n].

  Example:
    >>> s, i, j = product_topk_from_scores(jnp.array([0., 2., 1.]), jnp.array([5., 3., 4.]), 2)
    >>> s.tolist(), i.tolist(), j.tolist()
    ([7.0, 6.0], [1, 1], [0, 2])
  """
  # No gradient on any backend (the kernel has none): the selection is discrete.
  s1, s2 = (jax.lax.stop_gradient(jnp.asarray(s, jnp.float32)) for s in (s1, s2))
  _check(s1, s2, k, backend)
  if backend == "approx":
    return product_topk_approx(s1, s2, k)
  if backend == "xla":
    return product_topk_xla(s1, s2, k)
  ffi = k <= _FFI_MAX_K and cpu.ffi_status()[0]
  if backend == "cpu":
    return _product_topk_ffi(s1, s2, k) if ffi else product_topk_xla(s1, s2, k)
  branches = {"tpu": lambda a, b: product_topk_gather_free(a, b, k)}
  if ffi:
    branches["cpu"] = lambda a, b: _product_topk_ffi(a, b, k)
  return jax.lax.platform_dependent(s1, s2, **branches, default=lambda a, b: product_topk_xla(a, b, k))
