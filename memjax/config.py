"""Typed, validated configuration for memory layers.

Every config is a frozen dataclass checked in ``__post_init__``: a bad value raises ``ValueError``
naming the field and what is allowed, before anything is traced or allocated.

Glossary (the letters used in shape names across memjax):
  C   model (input/output) width            H   memory heads
  Dk  query / key width (both halves)       n   sub-keys per half (``n_keys``)
  M   slots = n * n                         Dv  value width (``value_dim``)
  k   slots read per head
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

INT32_MAX = 2**31 - 1

VALUE_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def _check_positive_int(owner: str, name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{owner}.{name}={value!r} must be a positive int, got {type(value).__name__}")
  if value <= 0:
    raise ValueError(f"{owner}.{name}={value} must be a positive int (> 0)")


def _check_bool(owner: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{owner}.{name}={value!r} must be True or False")


def _check_optional_positive_float(owner: str, name: str, value: Any) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{owner}.{name}={value!r} must be None (use the default) or a positive float")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """One product-key memory layer (and the value pool it reads).

  Attributes:
    n_keys: sub-keys per half ``n``; the memory has ``n_keys**2`` slots.
    heads: memory heads ``H``; each has its own query slice and sub-keys, all read one value table.
    k: slots read per head (top-k); must be ``<= n_keys``.
    key_dim: query/key width ``Dk`` (split in two halves of ``Dk // 2``); must be even.
    value_dim: value width ``Dv``.
    swilu: Memory+ output ``W2 (y * silu(W1 x))``. Off: ``y`` itself (or ``W_o y`` when
      ``value_dim != dim``).
    qk_norm: RMS-normalise each query half and each sub-key (with learned gains) and scale
      scores by ``(Dk/2)**-0.5``.
    gated: multiply the output by a per-token scalar ``sigmoid(w_g . x + b_g)``.
    value_dtype: storage dtype of the value table: one of ``VALUE_DTYPES``.
    key_init_scale: sub-keys ~ U(-a, a); ``None`` means ``a = key_dim**-0.5``.
    value_init_std: values ~ N(0, s); ``None`` means ``s = value_dim**-0.5``.
    out_init_std: ``W1``/``W2``/``W_o`` ~ N(0, s); ``None`` means ``s = fan_in**-0.5``.

  Example:
    >>> cfg = MemoryConfig(n_keys=32, heads=2, k=4, key_dim=16, value_dim=64)
    >>> cfg.num_slots
    1024
  """

  n_keys: int = 1024
  heads: int = 4
  k: int = 32
  key_dim: int = 512
  value_dim: int = 1024
  swilu: bool = True
  qk_norm: bool = False
  gated: bool = False
  value_dtype: str = "float32"
  key_init_scale: float | None = None
  value_init_std: float | None = None
  out_init_std: float | None = None

  def __post_init__(self):
    owner = "MemoryConfig"
    for name in ("n_keys", "heads", "k", "key_dim", "value_dim"):
      _check_positive_int(owner, name, getattr(self, name))
    for name in ("swilu", "qk_norm", "gated"):
      _check_bool(owner, name, getattr(self, name))
    for name in ("key_init_scale", "value_init_std", "out_init_std"):
      _check_optional_positive_float(owner, name, getattr(self, name))
    if self.k > self.n_keys:
      raise ValueError(
          f"{owner}.k={self.k} must be <= n_keys={self.n_keys}: the product top-k takes k of the "
          "n_keys sub-keys in each half")
    if self.key_dim % 2:
      raise ValueError(f"{owner}.key_dim={self.key_dim} must be even: the query splits in two halves")
    if self.n_keys**2 > INT32_MAX:
      raise ValueError(
          f"{owner}.n_keys={self.n_keys} gives n_keys**2={self.n_keys**2} slots, beyond int32 "
          f"indices (max {INT32_MAX}); allowed n_keys <= 46340")
    if self.value_dtype not in VALUE_DTYPES:
      raise ValueError(
          f"{owner}.value_dtype={self.value_dtype!r} is not supported; allowed: {sorted(VALUE_DTYPES)}")

  # ----- derived sizes -------------------------------------------------------------------------
  @property
  def num_slots(self) -> int:
    """M = n_keys**2."""
    return self.n_keys**2

  @property
  def jnp_value_dtype(self):
    return VALUE_DTYPES[self.value_dtype]

  def value_params(self) -> int:
    """Parameters of one value table: M * Dv."""
    return self.num_slots * self.value_dim

  def layer_params(self, dim: int) -> int:
    """Parameters one layer owns besides the value table (input/output width ``dim`` = C)."""
    _check_positive_int("MemoryConfig.layer_params", "dim", dim)
    h, dk, dv, n = self.heads, self.key_dim, self.value_dim, self.n_keys
    count = dim * h * dk + h * dk  # query projection W_q [C, H, Dk] and its bias [H, Dk]
    count += h * 2 * n * (dk // 2)  # sub-keys [H, 2, n, Dk/2]
    if self.qk_norm:
      count += 2 * h * dk  # query gains [H, Dk] and key gains [H, 2, Dk/2]
    if self.swilu:
      count += dim * dv + dv * dim  # W1 [C, Dv], W2 [Dv, C]
    elif dv != dim:
      count += dv * dim  # W_o [Dv, C]
    if self.gated:
      count += dim + 1  # w_g [C], b_g []
    return count

  def param_count(self, dim: int, *, layers: int = 1, shared: bool = True) -> int:
    """Total parameters of ``layers`` memory layers; ``shared`` means one value pool for all."""
    _check_positive_int("MemoryConfig.param_count", "layers", layers)
    tables = 1 if shared else layers
    return layers * self.layer_params(dim) + tables * self.value_params()

  def flops_per_token(self, dim: int) -> int:
    """Forward FLOPs of one layer for one token (multiply-add = 2 FLOPs).

    Counted: query projection ``2 C H Dk``; sub-key scores ``2 H n Dk`` (two halves of ``Dk/2``);
    the ``H k^2`` candidate sums; the read ``2 H k Dv``; the softmax ``~3 H k``; Memory+
    ``2 * 2 C Dv`` (or ``2 Dv C`` for ``W_o``) and the gating product ``Dv``; the scalar gate ``2 C``.
    Not counted: the top-k selections (comparisons, not FLOPs) and normalisations.
    """
    _check_positive_int("MemoryConfig.flops_per_token", "dim", dim)
    h, dk, dv, n, k = self.heads, self.key_dim, self.value_dim, self.n_keys, self.k
    flops = 2 * dim * h * dk + 2 * h * n * dk + h * k * k + 3 * h * k + 2 * h * k * dv
    if self.swilu:
      flops += 2 * 2 * dim * dv + dv
    elif dv != dim:
      flops += 2 * dv * dim
    if self.gated:
      flops += 2 * dim
    return flops

  def bytes_read_per_token(self) -> int:
    """Bytes of value rows a token gathers: H * k * Dv * bytes(value_dtype)."""
    return self.heads * self.k * self.value_dim * jnp.dtype(self.jnp_value_dtype).itemsize
