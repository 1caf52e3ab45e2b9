"""A run's whole configuration: the ``ml_collections.ConfigDict`` of ``configs/*.py`` <-> typed ``Config``.

``configs/base.py`` defines every key with its default; experiments are short diffs of it, and
``train.py`` takes dotted overrides (``--config.train.steps=200``). ``config_from_dict`` checks every
key and value (unknown keys and bad values raise ``ConfigError`` naming the dotted field) and builds
the frozen dataclasses the library uses.

The public contract (documented in the README):
  model.memory.{n_keys, heads, k, key_dim, value_dim, layers, swilu, qk_norm, shared,
                value_sharding, value_update}
  mesh.{data, fsdp, memory}
  train.{steps, batch_size, seq_len, lr, seed, checkpoint_every, eval_every}
  data.text_glob, eval.qa_jsonl
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memjax.config import (ConfigError, EvalConfig, LMMemoryConfig, MemoryConfig, MeshConfig, ModelConfig,
                           MoEConfig, TrainConfig, parse_layers)
from memjax.data.config import DataConfig

MEMORY_LAYER_KEYS = tuple(f.name for f in dataclasses.fields(MemoryConfig))
MEMORY_LM_KEYS = ("layers", "shared", "value_sharding", "value_update", "backend")
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("memory", "moe"))
MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoEConfig))


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. ``model.vocab_size == 0`` until the tokenizer fills it in."""

  model: ModelConfig
  train: TrainConfig
  mesh: MeshConfig
  data: DataConfig
  eval: EvalConfig
  backend: str = "auto"

  def with_vocab(self, vocab_size: int) -> "Config":
    return dataclasses.replace(self, model=dataclasses.replace(self.model, vocab_size=vocab_size))


def _as_dict(node: Any, field: str) -> dict:
  if hasattr(node, "to_dict"):
    return node.to_dict()
  if isinstance(node, Mapping):
    return dict(node)
  raise ConfigError(f"{field}={node!r} is invalid: must be a section (dict of fields)")


def _take(section: dict, allowed: tuple, field: str) -> dict:
  unknown = sorted(set(section) - set(allowed))
  if unknown:
    raise ConfigError(f"{field}.{unknown[0]} is not a known field; allowed: {sorted(allowed)}")
  return section


def _build(cls, kwargs: dict, field: str):
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    # MemoryConfig / DataConfig say "MemoryConfig.k=..."; name the dotted config field instead.
    message = str(e).splitlines()[0]
    for prefix in ("MemoryConfig.", "DataConfig."):
      message = message.replace(prefix, field + ".")
    raise ConfigError(message) from None


def _optional_str(value):
  return None if value in (None, "", "none", "None") else value


def config_from_dict(raw: Any) -> Config:
  """Typed, validated ``Config`` from a ConfigDict / nested dict (see ``configs/base.py``)."""
  top = _as_dict(raw, "config")
  _take(top, ("model", "train", "mesh", "data", "eval"), "config")
  model = _as_dict(top.get("model", {}), "model")
  memory = _as_dict(model.pop("memory", {}), "model.memory")
  moe = _as_dict(model.pop("moe", {}), "model.moe")
  _take(model, MODEL_KEYS, "model")
  _take(memory, MEMORY_LAYER_KEYS + MEMORY_LM_KEYS, "model.memory")
  _take(moe, MOE_KEYS, "model.moe")

  num_layers = model.get("num_layers", ModelConfig.num_layers)
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
    raise ConfigError(f"model.num_layers={num_layers!r} is invalid: must be a positive int")
  layer = _build(MemoryConfig, {k: memory[k] for k in MEMORY_LAYER_KEYS if k in memory}, "model.memory")
  backend = memory.get("backend", "auto")
  lm_memory = _build(LMMemoryConfig, dict(
      layer=layer, layers=parse_layers("model.memory.layers", memory.get("layers", ()), num_layers),
      **{k: memory[k] for k in ("shared", "value_sharding", "value_update") if k in memory}), "model.memory")
  moe = dict(moe)
  moe["layers"] = parse_layers("model.moe.layers", moe.get("layers", ()), num_layers)
  moe_cfg = _build(MoEConfig, moe, "model.moe")
  if model.get("vocab_size", None) == 0:
    model["vocab_size"] = 1  # placeholder until the tokenizer is known; see Config.with_vocab
  model_cfg = _build(ModelConfig, dict(model, memory=lm_memory, moe=moe_cfg), "model")

  def section(name, cls):
    values = _as_dict(top.get(name, {}), name)
    _take(values, tuple(f.name for f in dataclasses.fields(cls)), name)
    return _build(cls, values, name)

  data = _as_dict(top.get("data", {}), "data")
  for key in ("text_glob", "data_dir"):
    if key in data:
      data[key] = _optional_str(data[key])
  ev = _as_dict(top.get("eval", {}), "eval")
  if "qa_jsonl" in ev:
    ev["qa_jsonl"] = _optional_str(ev["qa_jsonl"])
  return Config(
      model=model_cfg, train=section("train", TrainConfig), mesh=section("mesh", MeshConfig),
      data=_build(DataConfig, _take(data, tuple(f.name for f in dataclasses.fields(DataConfig)), "data"), "data"),
      eval=_build(EvalConfig, _take(ev, tuple(f.name for f in dataclasses.fields(EvalConfig)), "eval"), "eval"),
      backend=backend)


def config_to_dict(cfg: Config) -> dict:
  """A JSON-able nested dict that ``config_from_dict`` turns back into ``cfg``."""
  model = dataclasses.asdict(cfg.model)
  mem = model.pop("memory")
  layer = mem.pop("layer")
  model["memory"] = {**layer, **mem, "layers": ",".join(map(str, cfg.model.memory.layers)),
                     "backend": cfg.backend}
  model["moe"]["layers"] = ",".join(map(str, cfg.model.moe.layers))
  return {"model": model, "train": dataclasses.asdict(cfg.train), "mesh": dataclasses.asdict(cfg.mesh),
          "data": dataclasses.asdict(cfg.data), "eval": dataclasses.asdict(cfg.eval)}


def config_from_json(raw: dict) -> Config:
  return config_from_dict(raw)


# Fields that fix the shapes of the saved state: a workdir written with other values cannot resume.
def shape_fields(cfg: Config) -> dict:
  """Flat ``{dotted field: value}`` of everything that determines the checkpoint's array shapes."""
  d = config_to_dict(cfg)
  out = {f"model.{k}": v for k, v in d["model"].items() if k not in ("memory", "moe", "dtype", "rope_theta")}
  init_only = ("key_init_scale", "value_init_std", "out_init_std")
  for k in tuple(k for k in MEMORY_LAYER_KEYS if k not in init_only) + ("layers", "shared", "value_update"):
    out[f"model.memory.{k}"] = d["model"]["memory"][k]
  for k in ("layers", "num_experts", "mlp_dim"):
    out[f"model.moe.{k}"] = d["model"]["moe"][k]
  return out


def shape_mismatch(saved: dict, current: Config) -> list[str]:
  """Dotted fields whose saved value differs from ``current`` (empty if the shapes agree)."""
  try:
    saved_fields = shape_fields(config_from_dict(saved))
  except ConfigError as e:
    return [f"unreadable saved config ({e})"]
  now = shape_fields(current)
  return [f"{k}: saved {saved_fields.get(k)!r}, now {now[k]!r}" for k in sorted(now)
          if saved_fields.get(k) != now[k]]
