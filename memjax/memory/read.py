"""The whole memory read as pure functions: query -> product top-k -> per-head softmax -> bag.

Shapes (``...`` is any leading batch shape):
  query   [..., H, Dk]      keys   [H, 2, n, Dk/2]     values [M = n*n, Dv]
  scores / weights / indices  [..., H, k]              out    [..., Dv]  (heads summed)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax import sharding
from memjax.kernels.embedding_bag import embedding_bag
from memjax.memory.product_keys import product_key_topk
from memjax.nn import rms_norm


class MemoryReadout(NamedTuple):
  """What one read returns: the summed value rows and the lookup that produced them."""

  out: jax.Array  # [..., Dv], dtype of the bag output
  indices: jax.Array  # [..., H, k] int32 slots
  weights: jax.Array  # [..., H, k] fp32 per-head softmax weights


def qk_normalize(query_xHxK, keys_Hx2xNxK2, query_gain_HxK=None, key_gain_Hx2xK2=None):
  """qk-norm for product keys: each query half and each sub-key RMS-normalised over Dk/2.

  The query is also scaled by ``(Dk/2)**-0.5`` so that a half-score of two unit-RMS random
  vectors has unit variance. Returns (query [..., H, Dk] fp32, keys [H, 2, n, Dk/2] fp32).
  """
  half = keys_Hx2xNxK2.shape[-1]
  q = query_xHxK.reshape(*query_xHxK.shape[:-1], 2, half)  # [..., H, 2, Dk/2]
  g = None if query_gain_HxK is None else query_gain_HxK.reshape(*query_gain_HxK.shape[:-1], 2, half)
  q = rms_norm(q, g, dtype=jnp.float32) * (half**-0.5)
  k_gain = None if key_gain_Hx2xK2 is None else key_gain_Hx2xK2[:, :, None, :]
  keys = rms_norm(keys_Hx2xNxK2, k_gain, dtype=jnp.float32)
  return q.reshape(query_xHxK.shape), keys


def memory_read(query, keys, values, *, k: int, backend: str = "auto", topk: str = "auto",
                read_mask=None) -> MemoryReadout:
  """Reads a product-key memory: exact top-k per head, softmax per head, one bag over all heads.

  Args:
    query: [..., H, Dk] queries (already projected, and normalised if qk-norm is wanted).
    keys: [H, 2, n, Dk/2] sub-keys.
    values: [n*n, Dv] value table shared by all heads.
    k: slots per head.
    backend: ``embedding_bag`` backend.
    topk: the selection's backend (``product_key_topk``): "auto", "xla", "cpu" or "approx".
    read_mask: optional ``(indices [..., H, k]) -> multiplier [..., H, k]`` applied to the softmax
      weights before the bag (0 removes a slot from the read; the others are not renormalised).
      ``memjax.inspect`` uses it for attribution. The returned weights are the unmasked ones.

  Returns:
    ``MemoryReadout(out [..., Dv], indices [..., H, k], weights [..., H, k])`` with
    ``out = sum_h sum_i weights[h, i] * values[indices[h, i]]``.

  Example:
    >>> q = jnp.ones((3, 2, 8)); keys = jnp.ones((2, 2, 4, 4)); values = jnp.ones((16, 5))
    >>> memory_read(q, keys, values, k=2).out.shape
    (3, 5)
  """
  n = keys.shape[2] if keys.ndim == 4 else None
  if values.ndim != 2:
    raise ValueError(f"values must have shape [M, Dv], got values.shape={values.shape}")
  if n is not None and values.shape[0] != n * n:
    raise ValueError(
        f"values has {values.shape[0]} rows but keys.shape={keys.shape} addresses n*n={n * n} slots")
  scores, indices = product_key_topk(query, keys, k, backend=topk)  # [..., H, k]
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [..., H, k]
  lead, heads = indices.shape[:-2], indices.shape[-2]
  idx_flat = indices.reshape(*lead, heads * k)  # [..., H*k]
  read_weights = weights if read_mask is None else weights * read_mask(indices).astype(weights.dtype)
  w_flat = read_weights.reshape(*lead, heads * k)
  out = embedding_bag(values, idx_flat, w_flat, backend=backend)  # [..., Dv]
  return MemoryReadout(out, indices, weights)


def _varying(x, axes):
  """``x`` marked as varying over ``axes`` inside ``shard_map`` (a no-op for axes it varies over)."""
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def sharded_memory_read(query, keys, values, *, k: int, backend: str = "auto",
                        value_sharding: str = "column", topk: str = "auto", read_mask=None) -> MemoryReadout:
  """``memory_read`` split explicitly over the mesh set by ``jax.set_mesh`` (plain read without one).

  Kernels (FFI, Pallas) are opaque to GSPMD, which would replicate their operands: gather the whole
  value table and every device's lookups. Under ``jax.shard_map`` each device reads only its part:
    column: the table is [M, Dv/m] per device; each device reads its Dv slice for its tokens.
            No communication; the output stays split over Dv (W2 contracts it: one reduce).
    row:    the table is [M/m, Dv]; each device reads the rows it owns (other lookups masked to
            weight 0), and the partial reads are summed over ``memory`` (one psum of [tokens, Dv]).
  Top-k runs per data shard (repeated on the devices of one memory group: it is O(n), not O(M)).
  Gradients follow by autodiff: value gradients stay on the shard that owns them. ``check_vma`` is
  off because the kernels' custom VJPs (FFI calls) do not carry varying-axis types; the ``pcast``
  marks below state the intent and keep the function correct if it is turned on.
  """
  lead = query.shape[:-2]
  specs = sharding.memory_read_specs(value_sharding, lead[0] if lead else 1, values.shape) if lead else None
  if specs is None:
    return memory_read(query, keys, values, k=k, backend=backend, topk=topk, read_mask=read_mask)
  if read_mask is not None:
    raise ValueError("read_mask is for single-device reads (no mesh set with jax.set_mesh)")
  batch, table_spec, out_last, psum_axis = specs.batch, specs.table, specs.out_last, specs.psum_axis
  P = jax.sharding.PartitionSpec
  rest = (None,) * (len(lead) - 1)
  batch_axes = sharding.axis_names(batch)
  table_axes = tuple(a for s in table_spec for a in sharding.axis_names(s))

  def local(q, kk, v):
    v = _varying(v, batch_axes)  # the table is the same on every data shard: its gradient sums
    scores, indices = product_key_topk(q, kk, k, backend=topk)  # [..., H, k] global slots
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    heads = indices.shape[-1] * indices.shape[-2]
    idx_flat = indices.reshape(*indices.shape[:-2], heads)  # [..., H*k]
    w_flat = weights.reshape(*indices.shape[:-2], heads)
    if psum_axis is not None:  # row mode: keep the rows this device owns, weight 0 elsewhere
      rows = v.shape[0]
      local_idx = idx_flat - jax.lax.axis_index(psum_axis) * rows
      mine = (local_idx >= 0) & (local_idx < rows)
      idx_flat, w_flat = jnp.where(mine, local_idx, 0), jnp.where(mine, w_flat, 0.0)
    # Each table shard sees every lookup: the weights' gradient sums over the table's axes.
    idx_flat, w_flat = _varying(idx_flat, table_axes), _varying(w_flat, table_axes)
    out = embedding_bag(v, idx_flat, w_flat, backend=backend)  # [..., Dv] or [..., Dv/m]
    if psum_axis is not None:
      out = jax.lax.psum(out, psum_axis)
    return MemoryReadout(out, indices, weights)

  out_specs = MemoryReadout(P(batch, *rest, out_last), P(batch, *rest, None, None), P(batch, *rest, None, None))
  return jax.shard_map(local, in_specs=(P(batch, *rest, None, None), P(), table_spec),
                       out_specs=out_specs, check_vma=False)(query, keys, values)
