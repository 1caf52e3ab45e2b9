"""Small pure building blocks shared by the model, the MoE blocks and the memory layer.

``param`` is how every parameter of memjax is made: an ``nnx.Param`` (or a subclass, such as the
value table's ``MemoryValue``) carrying ``logical_axes``, one name per dimension from
``memjax.sharding`` (which alone maps them to mesh axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value, *axes: str | None, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """``kind(value)`` annotated with its logical axes (one per dimension of ``value``)."""
  return kind(value, logical_axes=tuple(axes))


def normal_param(rngs: nnx.Rngs, shape: tuple, std: float, *axes: str | None) -> nnx.Param:
  """A float32 parameter ~ N(0, std), drawn from ``rngs.params()``."""
  return param(jax.random.normal(rngs.params(), shape, jnp.float32) * std, *axes)


def rms_norm(x, scale=None, *, eps: float = 1e-6, dtype=None):
  """``x / rms(x)`` over the last axis, computed in fp32, times ``scale`` (broadcast on the trailing
  axes, e.g. [C] or [H, Dk]); returned in ``dtype`` (default ``x.dtype``).

  Example:
    >>> [round(float(v), 3) for v in rms_norm(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]))]
    [0.849, 2.263]
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if scale is not None:
    scale = scale.astype(jnp.float32)
    y = y * scale.reshape((1,) * (y.ndim - scale.ndim) + scale.shape)  # explicit broadcast over leading axes
  return y.astype(x.dtype if dtype is None else dtype)
