"""NNX modules for product-key memory layers: thin owners of parameters around ``memory_read``.

Shapes:
  x       [..., C]          tokens in            out [..., C]
  W_q     [C, H, Dk]        query projection     b_q [H, Dk]
  keys    [H, 2, n, Dk/2]   sub-keys             values [M = n*n, Dv]  (``ValueTable``, shareable)
  W1      [C, Dv], W2 [Dv, C]   Memory+ gating (``swilu``); W_o [Dv, C] when not swilu and Dv != C

Forward, numbered:
  1. q = x W_q + b_q                                [..., C] -> [..., H, Dk]
  2. (qk_norm) q, keys = rms-normalised halves       scores become scale-free
  3. top-k slots, per-head softmax, bag over H*k     [..., H, Dk] -> [..., Dv]   (``memory_read``)
  4. swilu: out = (y * silu(x W1)) W2               [..., Dv] -> [..., C]
  5. (gated) out *= sigmoid(x . w_g + b_g)          one scalar per token

Initialisation (memory-layers.md §2): sub-keys U(+-1/sqrt(Dk)); values N(0, Dv^-1/2); W_q
Xavier-uniform; W1, W2, W_o N(0, fan_in^-1/2); biases 0; qk-norm gains 1.

Random streams are drawn in a fixed order (W_q, keys, own values, then output weights) so that
switching ``swilu``/``gated``/``qk_norm`` never changes the parameters they do not own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding as ax
from memjax.config import MemoryConfig
from memjax.memory.read import qk_normalize, sharded_memory_read
from memjax.nn import normal_param, param


class MemoryOutput(NamedTuple):
  """A layer's output with the lookup behind it (for usage statistics and probing)."""

  out: jax.Array  # [..., C]
  indices: jax.Array  # [..., H, k] int32
  weights: jax.Array  # [..., H, k] fp32


class MemoryValue(nnx.Param):
  """The value table's variable type: lets optimizers and sharding pick the table out of a model
  (``nnx.split(model, MemoryValue, nnx.Param)``) and give it its own learning rate and update rule."""


class ValueTable(nnx.Module):
  """The value pool ``values`` [M, Dv] in ``config.value_dtype``; pass one to several layers to share it.

  Example:
    >>> cfg = MemoryConfig(n_keys=8, heads=2, k=4, key_dim=8, value_dim=16)
    >>> pool = ValueTable(cfg, rngs=nnx.Rngs(0))
    >>> pool.values.shape
    (64, 16)
  """

  def __init__(self, config: MemoryConfig, *, rngs: nnx.Rngs):
    self.config = config
    std = config.value_init_std if config.value_init_std is not None else config.value_dim**-0.5
    shape = (config.num_slots, config.value_dim)
    table = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    self.values = param(table.astype(config.jnp_value_dtype), ax.SLOTS, ax.VALUE_DIM, kind=MemoryValue)


class ProductKeyMemory(nnx.Module):
  """A product-key memory layer (Memory, or Memory+ when ``config.swilu``) mapping [..., C] -> [..., C].

  Args:
    dim: C, the input and output width.
    config: the layer's ``MemoryConfig``.
    values: a ``ValueTable`` to read (shared pool); ``None`` creates this layer's own.
    backend: ``embedding_bag`` backend for the read.
    value_sharding: how the mesh splits the table ("column" or "row"); used only when a mesh is set
      with ``jax.set_mesh`` (the read then runs under ``jax.shard_map``, see ``sharded_memory_read``).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  ``layer(x)`` returns the output; ``layer.read(x)`` returns ``MemoryOutput`` with the slots and
  weights as well. Nothing is stored on the module during a call.

  Example:
    >>> cfg = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=8, value_dim=32)
    >>> layer = ProductKeyMemory(32, cfg, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 5, 32))).shape
    (2, 5, 32)
  """

  def __init__(self, dim: int, config: MemoryConfig, *, values: ValueTable | None = None,
               backend: str = "auto", value_sharding: str = "column", rngs: nnx.Rngs):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
      raise ValueError(f"ProductKeyMemory dim={dim!r} must be a positive int")
    if values is not None and values.config.num_slots != config.num_slots:
      raise ValueError(
          f"shared ValueTable has {values.config.num_slots} slots but config.n_keys={config.n_keys} "
          f"addresses {config.num_slots}")
    if values is not None and values.config.value_dim != config.value_dim:
      raise ValueError(
          f"shared ValueTable has value_dim={values.config.value_dim} but config.value_dim={config.value_dim}")
    self.dim, self.config, self.backend, self.value_sharding = dim, config, backend, value_sharding
    c, h, dk, dv, n = dim, config.heads, config.key_dim, config.value_dim, config.n_keys

    # 1. query projection (Xavier-uniform over fan_in C, fan_out H*Dk) and its bias.
    limit = (6.0 / (c + h * dk)) ** 0.5
    self.query = param(jax.random.uniform(rngs.params(), (c, h, dk), jnp.float32, -limit, limit),
                        ax.EMBED, ax.MEM_HEADS, ax.MEM_KEY_DIM)
    self.query_bias = param(jnp.zeros((h, dk), jnp.float32), ax.MEM_HEADS, ax.MEM_KEY_DIM)
    # 2. sub-keys U(+-a), a = 1/sqrt(Dk) by default.
    a = config.key_init_scale if config.key_init_scale is not None else dk**-0.5
    self.keys = param(jax.random.uniform(rngs.params(), (h, 2, n, dk // 2), jnp.float32, -a, a),
                       ax.MEM_HEADS, ax.MEM_HALVES, ax.MEM_KEYS, ax.MEM_KEY_DIM)
    # 3. the value pool: shared if given.
    self.values = values if values is not None else ValueTable(config, rngs=rngs)
    if config.qk_norm:
      self.query_gain = param(jnp.ones((h, dk), jnp.float32), ax.MEM_HEADS, ax.MEM_KEY_DIM)
      self.key_gain = param(jnp.ones((h, 2, dk // 2), jnp.float32),
                             ax.MEM_HEADS, ax.MEM_HALVES, ax.MEM_KEY_DIM)
    # 4. output: Memory+ gating, or a projection when widths differ.
    def normal(fan_in, shape, *axes):
      return normal_param(rngs, shape, config.out_init_std if config.out_init_std is not None else fan_in**-0.5,
                          *axes)

    if config.swilu:
      self.w1 = normal(c, (c, dv), ax.EMBED, ax.VALUE_DIM)
      self.w2 = normal(dv, (dv, c), ax.VALUE_DIM, ax.EMBED)
    elif dv != c:
      self.w_out = normal(dv, (dv, c), ax.VALUE_DIM, ax.EMBED)
    # 5. scalar sigmoid gate.
    if config.gated:
      self.gate_w = normal(c, (c,), ax.EMBED)
      self.gate_b = param(jnp.zeros((), jnp.float32))

  def queries(self, x):
    """Steps 1-2: [..., C] -> (query [..., H, Dk], keys [H, 2, n, Dk/2]) as the read sees them."""
    q = jnp.einsum("...c,chd->...hd", x, self.query[...].astype(x.dtype))  # [..., H, Dk]
    bias = self.query_bias[...].astype(x.dtype)
    q = q + bias.reshape((1,) * (q.ndim - 2) + bias.shape)
    keys = self.keys[...]
    if self.config.qk_norm:
      q, keys = qk_normalize(q, keys, self.query_gain[...], self.key_gain[...])
    return q, keys

  def read(self, x, *, value_tap=None, read_mask=None) -> MemoryOutput:
    """The full forward pass with the lookup: ``MemoryOutput(out [..., C], indices, weights)``.

    ``value_tap`` (for row-sparse value updates): a zero array [..., Dv] added to the read ``y``.
    When given, the table is read under ``stop_gradient`` (it gets no dense gradient) and the
    gradient with respect to the tap is the cotangent of ``y``; ``embedding_bag_row_grads``
    turns it, with the returned indices and weights, into the table's gradient rows.
    ``read_mask``: ``(indices [..., H, k]) -> multiplier`` on the read's weights (``memory_read``).
    """
    if x.shape[-1] != self.dim:
      raise ValueError(f"x.shape={x.shape}: last dim must be the layer's dim={self.dim}")
    q, keys = self.queries(x)
    table = self.values.values[...]
    if value_tap is not None:
      table = jax.lax.stop_gradient(table)
    r = sharded_memory_read(q, keys, table, k=self.config.k, backend=self.backend, topk=self.config.topk,
                            value_sharding=self.value_sharding, read_mask=read_mask)
    y = r.out  # [..., Dv]
    if value_tap is not None:
      y = y + value_tap.astype(y.dtype)
    y = y.astype(x.dtype)
    if self.config.swilu:
      gate = jax.nn.silu(x @ self.w1[...].astype(x.dtype))  # [..., Dv]
      out = (y * gate) @ self.w2[...].astype(x.dtype)  # [..., C]
    elif self.config.value_dim != self.dim:
      out = y @ self.w_out[...].astype(x.dtype)
    else:
      out = y
    if self.config.gated:
      g = jax.nn.sigmoid(x @ self.gate_w[...].astype(x.dtype) + self.gate_b[...].astype(x.dtype))
      out = out * g[..., None]
    return MemoryOutput(out, r.indices, r.weights)

  def __call__(self, x):
    """[..., C] -> [..., C]."""
    return self.read(x).out


def shared_memory_layers(dim: int, config: MemoryConfig, num_layers: int, *, backend: str = "auto",
                         rngs: nnx.Rngs) -> tuple[ValueTable, list[ProductKeyMemory]]:
  """``num_layers`` memory layers reading one shared ``ValueTable`` (the paper's shared pool).

  Each layer keeps its own query projection, sub-keys and output weights.

  Example:
    >>> cfg = MemoryConfig(n_keys=8, heads=1, k=2, key_dim=8, value_dim=16)
    >>> pool, layers = shared_memory_layers(16, cfg, 3, rngs=nnx.Rngs(0))
    >>> all(layer.values is pool for layer in layers)
    True
  """
  pool = ValueTable(config, rngs=rngs)
  layers = [ProductKeyMemory(dim, config, values=pool, backend=backend, rngs=rngs) for _ in range(num_layers)]
  return pool, layers
