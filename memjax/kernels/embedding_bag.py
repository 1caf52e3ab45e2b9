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
Backends register an ``EmbeddingBagBackend`` in ``BACKENDS``; ``xla`` is the plain-jnp reference.
The output dtype is ``jnp.result_type(values, weights)``; accumulation is always fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class EmbeddingBagBackend:
  """A forward and a backward implementation over flattened bags.

  ``forward(values [M, Dv], indices [B, L], weights [B, L]) -> [B, Dv]`` (in fp32 or the output dtype);
  ``backward(values, indices, weights, d_out [B, Dv]) -> (d_values [M, Dv], d_weights [B, L])``.
  """

  forward: Callable
  backward: Callable
  platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")


# ----- the xla reference backend ----------------------------------------------------------------


def _xla_forward(values_MxD, idx_BxL, w_BxL):
  rows_BxLxD = jnp.take(values_MxD, idx_BxL, axis=0)
  return jnp.einsum("bl,bld->bd", w_BxL.astype(jnp.float32), rows_BxLxD.astype(jnp.float32))


def _xla_backward(values_MxD, idx_BxL, w_BxL, dout_BxD):
  dout_BxD = dout_BxD.astype(jnp.float32)
  rows_BxLxD = jnp.take(values_MxD, idx_BxL, axis=0).astype(jnp.float32)
  dw_BxL = jnp.einsum("bd,bld->bl", dout_BxD, rows_BxLxD)
  contrib_BxLxD = w_BxL.astype(jnp.float32)[:, :, None] * dout_BxD[:, None, :]
  dv_MxD = jnp.zeros(values_MxD.shape, jnp.float32).at[idx_BxL].add(contrib_BxLxD)
  return dv_MxD, dw_BxL


BACKENDS: dict[str, EmbeddingBagBackend] = {
    "xla": EmbeddingBagBackend(_xla_forward, _xla_backward),
}

# Preferred backend per platform, first available wins. Kernel backends add themselves in front.
AUTO_ORDER: dict[str, list[str]] = {"cpu": ["xla"], "gpu": ["xla"], "tpu": ["xla"]}


def resolve_backend(backend: str) -> str:
  """Maps ``backend`` ("auto" or a name in ``BACKENDS``) to a concrete registered backend name."""
  if backend == "auto":
    platform = jax.default_backend()
    for name in AUTO_ORDER.get(platform, ["xla"]):
      if name in BACKENDS:
        return name
    return "xla"
  if backend not in BACKENDS:
    raise ValueError(f"embedding_bag backend={backend!r} is unknown; allowed: {['auto', *sorted(BACKENDS)]}")
  return backend


# ----- the public op ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(backend: str, values, idx_BxL, w_BxL):
  out_dtype = jnp.result_type(values.dtype, w_BxL.dtype)
  return BACKENDS[backend].forward(values, idx_BxL, w_BxL).astype(out_dtype)


def _bag_fwd(backend, values, idx_BxL, w_BxL):
  return _bag(backend, values, idx_BxL, w_BxL), (values, idx_BxL, w_BxL)


def _bag_bwd(backend, residuals, dout_BxD):
  values, idx_BxL, w_BxL = residuals
  dv, dw = BACKENDS[backend].backward(values, idx_BxL, w_BxL, dout_BxD)
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


def embedding_bag(values, indices, weights, *, backend: str = "auto"):
  """Weighted sum of gathered rows: ``out[..., :] = sum_l weights[..., l] * values[indices[..., l]]``.

  Args:
    values: [M, Dv] float table.
    indices: [..., L] integer rows, each in [0, M).
    weights: [..., L] float weights.
    backend: "auto" (best registered backend for the default platform) or a name in ``BACKENDS``.

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
  name = resolve_backend(backend)
  lead, bag = indices.shape[:-1], indices.shape[-1]
  idx_BxL = indices.reshape(-1, bag).astype(jnp.int32)
  w_BxL = weights.reshape(-1, bag)
  out_BxD = _bag(name, values, idx_BxL, w_BxL)
  return out_BxD.reshape(*lead, values.shape[1])


def _xla_row_grads(idx_N, w_N, dout_NxD, num_slots):
  # Sort the lookups by row, then sum each run of equal rows: deterministic, no [M, Dv] buffer.
  order = jnp.argsort(idx_N, stable=True)
  idx_sorted = idx_N[order]
  contrib = w_N[order].astype(jnp.float32)[:, None] * dout_NxD[order].astype(jnp.float32)  # [N, Dv]
  n = idx_N.shape[0]
  starts = jnp.concatenate([jnp.ones((1,), bool), idx_sorted[1:] != idx_sorted[:-1]])
  segment = jnp.cumsum(starts.astype(jnp.int32)) - 1  # run number of each sorted lookup
  grads = jax.ops.segment_sum(contrib, segment, num_segments=n, indices_are_sorted=True)
  rows = jnp.full((n,), num_slots, jnp.int32).at[segment].set(idx_sorted.astype(jnp.int32))
  return rows, grads


def embedding_bag_row_grads(indices, weights, d_out, num_slots: int):
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
  bag = indices.shape[-1]
  d = d_out.shape[-1]
  idx_N = indices.reshape(-1)
  w_N = weights.reshape(-1)
  dout_NxD = jnp.broadcast_to(d_out.reshape(-1, 1, d), (idx_N.shape[0] // bag, bag, d)).reshape(-1, d)
  return _xla_row_grads(idx_N, w_N, dout_NxD, num_slots)


def embedding_bag_reference(values, indices, weights):
  """Plain-jnp oracle (fp32 accumulation, autodiff gradients): what every backend must equal."""
  rows = jnp.take(values, indices, axis=0).astype(jnp.float32)
  out = jnp.einsum("...l,...ld->...d", weights.astype(jnp.float32), rows)
  return out.astype(jnp.result_type(values.dtype, weights.dtype))
