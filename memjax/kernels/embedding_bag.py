"""The embedding bag: a weighted sum of gathered value rows, with its gradients.

Shapes:
  values  [M, Dv]     the table (any float dtype; bf16 is accumulated in fp32)
  indices [..., L]    int rows of ``values`` (must lie in [0, M); unchecked under jit)
  weights [..., L]    one weight per gathered row
  out     [..., Dv]   out[b] = sum_l weights[b, l] * values[indices[b, l]]

Gradients (memory-layers.md §4):
  d_weights[b, l] = <d_out[b], values[indices[b, l]]>          gather and dot
  d_values[r]     = sum_{(b, l): indices[b, l] = r} weights[b, l] * d_out[b]   scatter-add

``embedding_bag`` is a ``jax.custom_vjp`` whose forward and backward are chosen by ``backend``.
Backends register an ``EmbeddingBagBackend`` in ``BACKENDS``; ``xla`` is the plain-jnp reference
(``xla.py`` holds both XLA backends and the one sort + segment sum the value gradients share).
The output dtype is ``jnp.result_type(values, weights)``; accumulation is always fp32.

Backends (each value gradient is atomic-free and deterministic: lookups sorted by row, each row sums
its own run; the weight gradient is a gather and a dot):
  xla                   plain jnp (take + einsum, dense scatter-add): the reference
  xla_loop              pure XLA tuned for CPU: a loop over the bag dimension, sort + segment sum
  cpu                   C++ kernels through the XLA FFI (cpu.py), falling back to xla_loop
  pallas_gpu            Pallas, Triton lowering (pallas_gpu.py)
  pallas_tpu            Pallas, Mosaic lowering, indices by scalar prefetch (pallas_tpu.py)
  pallas_*_interpret    the same kernels in Pallas interpret mode: run anywhere (tests on CPU)
``auto`` picks per platform, for the platform the computation is *lowered* for (never the host's
default backend: a step compiled on a CPU host for TPU or GPU gets that platform's kernel): for each
of cpu, gpu and tpu the first backend of ``AUTO_ORDER[platform]`` that accepts the arguments, the
three joined by ``jax.lax.platform_dependent`` (one branch is emitted per lowering).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memjax.kernels import cpu, pallas_gpu, pallas_tpu, xla


@dataclasses.dataclass(frozen=True)
class EmbeddingBagBackend:
  """A forward and a backward implementation over flattened bags.

  ``forward(values [M, Dv], indices [B, L], weights [B, L]) -> [B, Dv]`` (in fp32 or the output dtype);
  ``backward(values, indices, weights, d_out [B, Dv]) -> (d_values [M, Dv], d_weights [B, L])``.
  Optional:
  ``row_grads(indices, weights, d_out, num_slots) -> (rows [N], grads [N, Dv])``, the contract of
  ``embedding_bag_row_grads`` (None: ``xla.sorted_row_grads``);
  ``check(values, indices, weights, block_sizes)`` raises ValueError naming what the backend cannot
  take (``auto`` then moves on to the next backend);
  ``block_sizes``: when the caller passes ``block_sizes``, it reaches forward, backward and row_grads
  as a keyword (backends without a ``check`` must not be given any).
  """

  forward: Callable
  backward: Callable
  row_grads: Callable | None = None
  check: Callable | None = None


def _no_block_sizes(name):
  def check(values, idx_BxL, w_BxL, block_sizes=None):
    del values, idx_BxL, w_BxL
    if block_sizes is not None:
      raise ValueError(f"backend {name!r} takes no block sizes, got {block_sizes=}")
  return check


BACKENDS: dict[str, EmbeddingBagBackend] = {
    "xla": EmbeddingBagBackend(xla.forward, xla.backward, check=_no_block_sizes("xla")),
    "xla_loop": EmbeddingBagBackend(xla.loop_forward, xla.loop_backward, row_grads=xla.sorted_row_grads,
                                    check=_no_block_sizes("xla_loop")),
    "cpu": EmbeddingBagBackend(cpu.forward, cpu.backward, row_grads=cpu.row_grads, check=cpu.check),
}
for _interpret, _suffix in ((False, ""), (True, "_interpret")):
  BACKENDS["pallas_gpu" + _suffix] = EmbeddingBagBackend(
      functools.partial(pallas_gpu.forward, interpret=_interpret),
      functools.partial(pallas_gpu.backward, interpret=_interpret),
      row_grads=functools.partial(pallas_gpu.row_grads, interpret=_interpret),
      check=pallas_gpu.check)
  BACKENDS["pallas_tpu" + _suffix] = EmbeddingBagBackend(
      functools.partial(pallas_tpu.forward, interpret=_interpret),
      functools.partial(pallas_tpu.backward, interpret=_interpret),
      row_grads=functools.partial(pallas_tpu.row_grads, interpret=_interpret),
      check=pallas_tpu.check)

# Preferred backends per platform: ``auto`` takes the first registered one that accepts the arguments
# (its ``check`` passes), so e.g. float16 values on CPU fall through to ``xla``.
AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["cpu", "xla"],
    "gpu": ["pallas_gpu", "xla"],
    "tpu": ["pallas_tpu", "xla"],
}


PLATFORMS = ("cpu", "gpu", "tpu")


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps ``backend`` ("auto" or a name in ``BACKENDS``) to a concrete registered backend name.

  "auto" gives the first registered name in ``AUTO_ORDER[platform]`` (default: this process's
  default backend). Ops choose per lowering platform instead (``embedding_bag`` additionally skips
  backends whose ``check`` rejects its arguments).
  """
  if backend == "auto":
    platform = jax.default_backend() if platform is None else platform
    for name in AUTO_ORDER.get(platform, ["xla"]):
      if name in BACKENDS:
        return name
    return "xla"
  if backend not in BACKENDS:
    raise ValueError(f"embedding_bag backend={backend!r} is unknown; allowed: {['auto', *sorted(BACKENDS)]}")
  return backend


def _select(backend: str, values, idx_BxL, w_BxL, block_sizes):
  """The backend to run: an explicit name (checked; errors propagate), or for "auto" one name per
  platform of ``PLATFORMS`` (a tuple; one name if they agree), each the first that accepts the arguments."""
  if backend != "auto":
    name = resolve_backend(backend)
    if BACKENDS[name].check is not None:
      BACKENDS[name].check(values, idx_BxL, w_BxL, block_sizes)
    elif block_sizes is not None:
      raise ValueError(f"backend {name!r} takes no block sizes, got {block_sizes=}")
    return name
  names = tuple(_first_accepting(p, values, idx_BxL, w_BxL, block_sizes) for p in PLATFORMS)
  return names[0] if len(set(names)) == 1 else names


def _first_accepting(platform: str, values, idx_BxL, w_BxL, block_sizes) -> str:
  candidates = [n for n in AUTO_ORDER.get(platform, []) if n in BACKENDS] + ["xla"]
  reasons = []
  for name in candidates:
    try:
      if BACKENDS[name].check is not None:
        BACKENDS[name].check(values, idx_BxL, w_BxL, block_sizes)
      elif block_sizes is not None:
        raise ValueError(f"backend {name!r} takes no block sizes")
      return name
    except ValueError as e:
      reasons.append(f"{name}: {e}")
  raise ValueError("no embedding_bag backend accepts these arguments: " + "; ".join(reasons))


def _kw(block_sizes):
  return {} if block_sizes is None else {"block_sizes": block_sizes}


# ----- batching: kernels see one flat batch of bags ----------------------------------------------


def _map_batch(fn, axis_size, in_batched, *args):
  """Runs fn once per vmapped element (broadcasting unbatched arguments): always correct."""
  args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
  return lax.map(lambda xs: fn(*xs), args)


@functools.lru_cache(maxsize=None)
def _batchable_forward(name: str, block_sizes):
  """The backend's forward under ``custom_vmap``: vmapped bags fold into the bag batch when the
  table is shared (one kernel call), else a sequential map."""
  fn = functools.partial(BACKENDS[name].forward, **_kw(block_sizes))

  @jax.custom_batching.custom_vmap
  def forward(values, idx_BxL, w_BxL):
    return fn(values, idx_BxL, w_BxL)

  @forward.def_vmap
  def _rule(axis_size, in_batched, values, idx_BxL, w_BxL):
    if in_batched[0]:
      return _map_batch(forward, axis_size, in_batched, values, idx_BxL, w_BxL), True
    idx, w = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
              for a, b in zip((idx_BxL, w_BxL), in_batched[1:])]
    out = forward(values, idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1]))
    return out.reshape(axis_size, -1, out.shape[-1]), True

  return forward


@functools.lru_cache(maxsize=None)
def _batchable_backward(name: str, block_sizes):
  """The backend's backward under ``custom_vmap``: per-element gradients by a sequential map."""
  fn = functools.partial(BACKENDS[name].backward, **_kw(block_sizes))

  @jax.custom_batching.custom_vmap
  def backward(values, idx_BxL, w_BxL, dout_BxD):
    return fn(values, idx_BxL, w_BxL, dout_BxD)

  @backward.def_vmap
  def _rule(axis_size, in_batched, *args):
    return _map_batch(backward, axis_size, in_batched, *args), (True, True)

  return backward


def per_platform(fns: dict):
  """``{platform in PLATFORMS: fn}`` as one function that runs the lowering platform's ``fn``."""
  def call(*args):
    return lax.platform_dependent(*args, cpu=fns["cpu"], cuda=fns["gpu"], rocm=fns["gpu"], tpu=fns["tpu"],
                                  default=fns["cpu"])
  return call


def _forward_fn(name, block_sizes):
  if isinstance(name, tuple):  # auto: one backend per platform
    return per_platform({p: _forward_fn(n, block_sizes) for p, n in zip(PLATFORMS, name)})
  return BACKENDS[name].forward if name == "xla" else _batchable_forward(name, block_sizes)


def _backward_fn(name, block_sizes):
  if isinstance(name, tuple):
    return per_platform({p: _backward_fn(n, block_sizes) for p, n in zip(PLATFORMS, name)})
  return BACKENDS[name].backward if name == "xla" else _batchable_backward(name, block_sizes)


def _row_grads_fn(name, num_slots: int, block_sizes):
  if isinstance(name, tuple):
    return per_platform({p: _row_grads_fn(n, num_slots, block_sizes) for p, n in zip(PLATFORMS, name)})
  if BACKENDS[name].row_grads is None:
    return lambda idx, w, dout: xla.sorted_row_grads(idx, w, dout, num_slots)
  return lambda idx, w, dout: BACKENDS[name].row_grads(idx, w, dout, num_slots, **_kw(block_sizes))


# ----- the public op ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bag(backend: str, block_sizes, values, idx_BxL, w_BxL):
  out_dtype = jnp.result_type(values.dtype, w_BxL.dtype)
  return _forward_fn(backend, block_sizes)(values, idx_BxL, w_BxL).astype(out_dtype)


def _bag_fwd(backend, block_sizes, values, idx_BxL, w_BxL):
  return _bag(backend, block_sizes, values, idx_BxL, w_BxL), (values, idx_BxL, w_BxL)


def _bag_bwd(backend, block_sizes, residuals, dout_BxD):
  values, idx_BxL, w_BxL = residuals
  dv, dw = _backward_fn(backend, block_sizes)(values, idx_BxL, w_BxL, dout_BxD)
  d_idx = np.zeros(idx_BxL.shape, dtype=jax.dtypes.float0)
  return dv.astype(values.dtype), d_idx, dw.astype(w_BxL.dtype)


_bag.defvjp(_bag_fwd, _bag_bwd)


def _check_bag_args(values, indices, weights):
  if values.ndim != 2:
    raise ValueError(f"values must have shape [M, Dv], got values.shape={values.shape}")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"values must be a float array, got values.dtype={values.dtype}")
  if indices.ndim < 1:
    raise ValueError(f"indices must have shape [..., L], got indices.shape={indices.shape}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be an integer array, got indices.dtype={indices.dtype}")
  if weights.shape != indices.shape:
    raise ValueError(
        f"weights.shape={weights.shape} must equal indices.shape={indices.shape}")
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f"weights must be a float array, got weights.dtype={weights.dtype}")


def embedding_bag(values, indices, weights, *, backend: str = "auto", block_sizes=None):
  """Weighted sum of gathered rows: ``out[..., :] = sum_l weights[..., l] * values[indices[..., l]]``.

  Args:
    values: [M, Dv] float table.
    indices: [..., L] integer rows, each in [0, M) (kernel backends clamp others to the table).
    weights: [..., L] float weights.
    backend: "auto" (per lowering platform, the first backend of ``AUTO_ORDER`` that accepts the
      arguments) or a name in ``BACKENDS``; an explicit name raises ValueError naming what it rejects.
    block_sizes: a Pallas backend's ``BlockSizes`` (``pallas_gpu.BlockSizes``/``pallas_tpu.BlockSizes``);
      None picks defaults that fit the shapes.

  Returns:
    [..., Dv] in ``jnp.result_type(values.dtype, weights.dtype)``, accumulated in fp32.
    Differentiable in ``values`` and ``weights`` (custom VJP); works under jit, vmap and grad.

  Example:
    >>> values = jnp.arange(6.0).reshape(3, 2)
    >>> embedding_bag(values, jnp.array([[0, 2]]), jnp.array([[1.0, 0.5]]))
    Array([[2. , 3.5]], dtype=float32)
  """
  values, indices, weights = jnp.asarray(values), jnp.asarray(indices), jnp.asarray(weights)
  _check_bag_args(values, indices, weights)
  lead, bag = indices.shape[:-1], indices.shape[-1]
  idx_BxL = indices.reshape(-1, bag).astype(jnp.int32)
  w_BxL = weights.reshape(-1, bag)
  name = _select(backend, values, idx_BxL, w_BxL, block_sizes)
  out_BxD = _bag(name, block_sizes, values, idx_BxL, w_BxL)
  return out_BxD.reshape(*lead, values.shape[1])


# The row-gradient kernels only read d_out; backends are asked about a table of this dtype.
_ROW_GRAD_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def embedding_bag_row_grads(indices, weights, d_out, num_slots: int, *, backend: str = "auto",
                            block_sizes=None):
  """The value gradient of ``embedding_bag`` as (rows, row gradients), never as a [M, Dv] array.

  For the row-sparse optimizer: with N = the number of lookups (``indices.size``),
    rows  [N] int32: the distinct rows read, ascending, then padding equal to ``num_slots``
          (out of range: ``.at[rows].add(..., mode="drop")`` ignores it);
    grads [N, Dv] fp32: ``grads[u] = sum_{(b, l): indices[b, l] = rows[u]} weights[b, l] * d_out[b]``,
          zero on padding.
  Scattering ``grads`` into zeros at ``rows`` gives exactly the dense gradient of ``embedding_bag``.

  Args:
    indices: [..., L] int rows in [0, num_slots).
    weights: [..., L] weights of the forward pass.
    d_out: [..., Dv] cotangent of the bag output.
    num_slots: M, static.
    backend: as for ``embedding_bag``; backends with a ``row_grads`` kernel use it (``cpu``: one C++
      call; Pallas: the segment-sum kernel), the others the sort + segment-sum XLA version.
    block_sizes: a Pallas backend's ``BlockSizes``, or None.

  Example:
    >>> rows, g = embedding_bag_row_grads(jnp.array([[3, 1, 3]]), jnp.array([[1.0, 2.0, 0.5]]),
    ...                                   jnp.array([[1.0, 10.0]]), num_slots=5)
    >>> rows.tolist(), g[:2].tolist()
    ([1, 3, 5], [[2.0, 20.0], [1.5, 15.0]])
  """
  indices, weights, d_out = jnp.asarray(indices), jnp.asarray(weights), jnp.asarray(d_out)
  if weights.shape != indices.shape:
    raise ValueError(f"weights.shape={weights.shape} must equal indices.shape={indices.shape}")
  if d_out.shape[:-1] != indices.shape[:-1]:
    raise ValueError(f"d_out.shape={d_out.shape} must be indices' leading shape {indices.shape[:-1]} + (Dv,)")
  bag, d = indices.shape[-1], d_out.shape[-1]
  idx_BxL = indices.reshape(-1, bag).astype(jnp.int32)
  w_BxL = weights.reshape(-1, bag)
  dout_BxD = d_out.reshape(-1, d)
  table = jax.ShapeDtypeStruct((num_slots, d), d_out.dtype if d_out.dtype in _ROW_GRAD_DTYPES else jnp.float32)
  name = _select(backend, table, idx_BxL, w_BxL, block_sizes)
  return _row_grads_fn(name, num_slots, block_sizes)(idx_BxL, w_BxL, dout_BxD)


def embedding_bag_reference(values, indices, weights):
  """Plain-jnp oracle (fp32 accumulation, autodiff gradients): what every backend must equal."""
  rows = jnp.take(values, indices, axis=0).astype(jnp.float32)
  out = jnp.einsum("...l,...ld->...d", weights.astype(jnp.float32), rows)
  return out.astype(jnp.result_type(values.dtype, weights.dtype))
