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


# ================================================================================================
# The language model and its training run. ``configs/*.py`` build an ``ml_collections.ConfigDict``
# with the same nesting; ``Config.from_dict`` turns it into these typed, validated dataclasses.
# ================================================================================================


class ConfigError(ValueError):
  """A bad configuration value; the message is one line naming the field and what is allowed."""


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def _pos_int(field, value, *, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
    _fail(field, value, "must be a non-negative int" if allow_zero else "must be a positive int")


def _pos_float(field, value, *, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
    _fail(field, value, "must be a finite float >= 0" if allow_zero else "must be a finite float > 0")


def _choice(field, value, allowed):
  if value not in allowed:
    _fail(field, value, f"allowed: {list(allowed)}")


def parse_layers(field: str, spec: Any, num_layers: int) -> tuple[int, ...]:
  """Layer indices from a tuple/list of ints, a string "4,12,20", "" (none) or "centered:N".

  "centered:N" spreads N layers with a large stride around the middle: layer round((i + 1/2) L / N),
  e.g. 24 layers, N = 3 -> (4, 12, 20), the paper's Memory+ placement.
  """
  if spec is None or spec == "" or spec == ():
    return ()
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith("centered:"):
      count = text.split(":", 1)[1]
      if not count.isdigit() or not 0 < int(count) <= num_layers:
        _fail(field, spec, f"'centered:N' needs 1 <= N <= num_layers={num_layers}")
      n = int(count)
      layers = tuple(round((i + 0.5) * num_layers / n) for i in range(n))
      return tuple(min(max(l, 0), num_layers - 1) for l in layers)
    try:
      spec = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
      _fail(field, spec, "use comma-separated layer indices like '4,12,20' or 'centered:3'")
  if isinstance(spec, int) and not isinstance(spec, bool):
    spec = (spec,)
  if not isinstance(spec, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
    _fail(field, spec, "use layer indices like (4, 12, 20), '4,12,20' or 'centered:3'")
  layers = tuple(spec)
  for i in layers:
    if not 0 <= i < num_layers:
      _fail(field, spec, f"every index must be in [0, num_layers={num_layers})")
  if len(set(layers)) != len(layers):
    _fail(field, spec, "indices must be distinct")
  return tuple(sorted(layers))


@dataclasses.dataclass(frozen=True)
class LMMemoryConfig:
  """``config.model.memory``: the layer (``MemoryConfig``) plus where and how the LM uses it.

  layers: block indices whose FFN is a memory layer (``()`` = none).
  shared: all memory layers read one value pool (the paper's Memory+ layout).
  value_sharding: "column" (split value_dim over the mesh's ``memory`` axis) or "row" (split slots).
  value_update: "dense" (dense gradient, dense AdamW, like the paper's code) or "sparse"
    (row-sparse Adam: only rows the step read are updated; see ``memjax.optim``).
  """

  layer: MemoryConfig = MemoryConfig()
  layers: tuple[int, ...] = ()
  shared: bool = True
  value_sharding: str = "column"
  value_update: str = "sparse"

  def __post_init__(self):
    _check_bool("model.memory", "shared", self.shared)
    _choice("model.memory.value_sharding", self.value_sharding, ("column", "row"))
    _choice("model.memory.value_update", self.value_update, ("dense", "sparse"))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """``config.model.moe``: top-k routed SwiGLU experts (the paper's MoE baseline)."""

  layers: tuple[int, ...] = ()
  num_experts: int = 8
  top_k: int = 2
  mlp_dim: int = 0  # 0 -> the dense FFN's mlp_dim
  capacity_factor: float = 1.25
  aux_loss_weight: float = 0.01

  def __post_init__(self):
    _pos_int("model.moe.num_experts", self.num_experts)
    _pos_int("model.moe.top_k", self.top_k)
    _pos_int("model.moe.mlp_dim", self.mlp_dim, allow_zero=True)
    _pos_float("model.moe.capacity_factor", self.capacity_factor)
    _pos_float("model.moe.aux_loss_weight", self.aux_loss_weight, allow_zero=True)
    if self.top_k > self.num_experts:
      _fail("model.moe.top_k", self.top_k, f"must be <= model.moe.num_experts={self.num_experts}")


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``config.model``: a pre-norm decoder-only LM (RMSNorm, RoPE, causal attention, SwiGLU FFN).

  Each block's feed-forward is a memory layer if its index is in ``memory.layers``, an MoE if in
  ``moe.layers``, else a dense SwiGLU FFN of width ``mlp_dim``.
  """

  vocab_size: int = 259
  dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  rope_theta: float = 10000.0
  dtype: str = "float32"
  tie_embeddings: bool = True
  memory: LMMemoryConfig = LMMemoryConfig()
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "head_dim", "mlp_dim"):
      _pos_int(f"model.{name}", getattr(self, name))
    _pos_float("model.rope_theta", self.rope_theta)
    _choice("model.dtype", self.dtype, tuple(COMPUTE_DTYPES))
    _check_bool("model", "tie_embeddings", self.tie_embeddings)
    if self.head_dim % 2:
      _fail("model.head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
    for field, layers in (("model.memory.layers", self.memory.layers), ("model.moe.layers", self.moe.layers)):
      for i in layers:
        if not 0 <= i < self.num_layers:
          _fail(field, layers, f"every index must be in [0, model.num_layers={self.num_layers})")
    both = set(self.memory.layers) & set(self.moe.layers)
    if both:
      _fail("model.moe.layers", self.moe.layers, f"overlaps model.memory.layers at {sorted(both)}")

  def block_kind(self, i: int) -> str:
    """"memory", "moe" or "dense" for block ``i``."""
    if i in self.memory.layers:
      return "memory"
    if i in self.moe.layers:
      return "moe"
    return "dense"

  @property
  def moe_mlp_dim(self) -> int:
    return self.moe.mlp_dim or self.mlp_dim

  # ----- formulas -----
  def param_counts(self) -> dict:
    """{"total", "active", "values", "embedding"}: active = parameters a token's forward touches."""
    c, v = self.dim, self.vocab_size
    attn = c * self.num_heads * self.head_dim * 4
    norms = 2 * c
    dense = 3 * c * self.mlp_dim
    moe_total = c * self.moe.num_experts + self.moe.num_experts * 3 * c * self.moe_mlp_dim
    moe_active = c * self.moe.num_experts + self.moe.top_k * 3 * c * self.moe_mlp_dim
    mem = self.memory.layer
    total = active = 0
    for i in range(self.num_layers):
      kind = self.block_kind(i)
      total += attn + norms
      active += attn + norms
      if kind == "dense":
        total += dense
        active += dense
      elif kind == "moe":
        total += moe_total
        active += moe_active
      else:
        total += mem.layer_params(c)
        active += mem.layer_params(c) - mem.heads * mem.n_keys * mem.key_dim  # keys: O(n) are read
        active += mem.heads * mem.n_keys * mem.key_dim + mem.heads * mem.k * mem.value_dim
    n_mem = len(self.memory.layers)
    tables = (1 if self.memory.shared else n_mem) if n_mem else 0
    values = tables * mem.value_params()
    embedding = v * c * (1 if self.tie_embeddings else 2)
    total += values + embedding + c  # final norm
    active += embedding + c
    return {"total": total, "active": active, "values": values, "embedding": embedding}

  def flops_per_token(self, seq_len: int) -> int:
    """Forward FLOPs per token (matmuls; attention scores with the full causal window averaged)."""
    c = self.dim
    hd = self.num_heads * self.head_dim
    flops = 0
    for i in range(self.num_layers):
      flops += 2 * c * hd * 4 + 2 * 2 * hd * (seq_len + 1) // 2  # projections + causal scores/values
      kind = self.block_kind(i)
      if kind == "dense":
        flops += 2 * 3 * c * self.mlp_dim
      elif kind == "moe":
        flops += 2 * c * self.moe.num_experts + self.moe.top_k * 2 * 3 * c * self.moe_mlp_dim
      else:
        flops += self.memory.layer.flops_per_token(c)
    flops += 2 * c * self.vocab_size  # unembedding
    return flops


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """``config.train``: the optimisation run."""

  steps: int = 1000
  batch_size: int = 16
  seq_len: int = 128
  lr: float = 3e-3
  value_lr: float = 0.0  # 0 -> value_lr_mult * lr
  value_lr_mult: float = 10.0
  warmup_steps: int = 50
  decay: str = "linear"
  final_lr_frac: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  value_weight_decay: float = 0.0
  clip: float = 1.0
  value_clip: float = 1.0
  seed: int = 0
  checkpoint_every: int = 200
  eval_every: int = 200
  log_every: int = 10
  max_checkpoints: int = 3
  nan_policy: str = "stop"

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every", "max_checkpoints"):
      _pos_int(f"train.{name}", getattr(self, name))
    for name in ("warmup_steps", "seed", "checkpoint_every", "eval_every"):
      _pos_int(f"train.{name}", getattr(self, name), allow_zero=True)
    for name in ("lr", "value_lr_mult", "eps"):
      _pos_float(f"train.{name}", getattr(self, name))
    for name in ("value_lr", "weight_decay", "value_weight_decay", "clip", "value_clip"):
      _pos_float(f"train.{name}", getattr(self, name), allow_zero=True)
    for name in ("b1", "b2", "final_lr_frac"):
      value = getattr(self, name)
      _pos_float(f"train.{name}", value, allow_zero=True)
      if value > 1:
        _fail(f"train.{name}", value, "must be in [0, 1]")
    _choice("train.decay", self.decay, ("linear", "cosine", "constant"))
    _choice("train.nan_policy", self.nan_policy, ("stop", "skip"))

  @property
  def value_learning_rate(self) -> float:
    return self.value_lr or self.lr * self.value_lr_mult


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """``config.mesh``: sizes of the ``data``, ``fsdp`` and ``memory`` axes; -1 = the remaining devices."""

  data: int = -1
  fsdp: int = 1
  memory: int = 1

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "memory": self.memory}
    for name, value in sizes.items():
      if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        _fail(f"mesh.{name}", value, "must be a positive int or -1 (the rest of the devices)")
    if sum(v == -1 for v in sizes.values()) > 1:
      _fail("mesh", sizes, "at most one axis may be -1")

  def resolve(self, num_devices: int) -> dict:
    """Concrete sizes whose product is ``num_devices``."""
    sizes = {"data": self.data, "fsdp": self.fsdp, "memory": self.memory}
    known = 1
    for v in sizes.values():
      known *= v if v != -1 else 1
    if -1 in sizes.values():
      if num_devices % known:
        _fail("mesh", sizes, f"fixed axes (product {known}) must divide the {num_devices} devices")
      sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != num_devices:
      _fail("mesh", sizes, f"the product of the axes must equal the {num_devices} devices (or use -1)")
    return sizes


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """``config.eval``: validation loss, memory usage and closed-book QA."""

  qa_jsonl: str | None = None
  qa_from_kb: bool = True
  qa_max_items: int = 512
  qa_batch_size: int = 64
  qa_max_answer_tokens: int = 0  # 0 = one more than the longest answer's tokens
  qa_seq_len: int = 64  # decoding window; 0 = train.seq_len
  eval_batches: int = 4

  def __post_init__(self):
    if self.qa_jsonl is not None and (not isinstance(self.qa_jsonl, str) or not self.qa_jsonl):
      _fail("eval.qa_jsonl", self.qa_jsonl, "must be a path to a JSONL file or None")
    _check_bool("eval", "qa_from_kb", self.qa_from_kb)
    for name in ("qa_max_items", "qa_batch_size"):
      _pos_int(f"eval.{name}", getattr(self, name))
    _pos_int("eval.qa_max_answer_tokens", self.qa_max_answer_tokens, allow_zero=True)
    _pos_int("eval.qa_seq_len", self.qa_seq_len, allow_zero=True)
    _pos_int("eval.eval_batches", self.eval_batches, allow_zero=True)
