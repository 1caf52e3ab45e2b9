"""The whole memory read as pure functions: query -> product top-k -> per-head softmax -> bag.

Shapes (``...`` is any leading batch shape):
  query   [..., H, Dk]      keys   [H, 2, n, Dk/2]     values [M = n*n, Dv]
  scores / weights / indices  [..., H, k]              out    [..., Dv]  (heads summed)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.kernels.embedding_bag import embedding_bag
from memjax.memory.product_keys import product_key_topk


class MemoryReadout(NamedTuple):
  """What one read returns: the summed value rows and the lookup that produced them."""

  out: jax.Array  # [..., Dv], dtype of the bag output
  indices: jax.Array  # [..., H, k] int32 slots
  weights: jax.Array  # [..., H, k] fp32 per-head softmax weights


def rms_normalize(x, gain=None, *, eps: float = 1e-6):
  """x / rms(x) over the last axis (fp32), optionally times a learned ``gain`` broadcast on it."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if gain is not None:
    gain = gain.astype(jnp.float32)
    y = y * gain.reshape((1,) * (y.ndim - gain.ndim) + gain.shape)  # explicit broadcast over leading axes
  return y


def qk_normalize(query_xHxK, keys_Hx2xNxK2, query_gain_HxK=None, key_gain_Hx2xK2=None):
  """qk-norm for product keys: each query half and each sub-key RMS-normalised over Dk/2.

  The query is also scaled by ``(Dk/2)**-0.5`` so that a half-score of two unit-RMS random
  vectors has unit variance. Returns (query [..., H, Dk] fp32, keys [H, 2, n, Dk/2] fp32).
  """
  half = keys_Hx2xNxK2.shape[-1]
  q = query_xHxK.reshape(*query_xHxK.shape[:-1], 2, half)  # [..., H, 2, Dk/2]
  g = None if query_gain_HxK is None else query_gain_HxK.reshape(*query_gain_HxK.shape[:-1], 2, half)
  q = rms_normalize(q, g) * (half**-0.5)
  k_gain = None if key_gain_Hx2xK2 is None else key_gain_Hx2xK2[:, :, None, :]
  keys = rms_normalize(keys_Hx2xNxK2, k_gain)
  return q.reshape(query_xHxK.shape), keys


def memory_read(query, keys, values, *, k: int, backend: str = "auto") -> MemoryReadout:
  """Reads a product-key memory: exact top-k per head, softmax per head, one bag over all heads.

  Args:
    query: [..., H, Dk] queries (already projected, and normalised if qk-norm is wanted).
    keys: [H, 2, n, Dk/2] sub-keys.
    values: [n*n, Dv] value table shared by all heads.
    k: slots per head.
    backend: ``embedding_bag`` backend.

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
  scores, indices = product_key_topk(query, keys, k)  # [..., H, k]
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # [..., H, k]
  lead, heads = indices.shape[:-2], indices.shape[-2]
  idx_flat = indices.reshape(*lead, heads * k)  # [..., H*k]
  w_flat = weights.reshape(*lead, heads * k)
  out = embedding_bag(values, idx_flat, w_flat, backend=backend)  # [..., Dv]
  return MemoryReadout(out, indices, weights)
