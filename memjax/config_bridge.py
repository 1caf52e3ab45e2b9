"""The bridge between ``configs/*.py`` (``ml_collections.ConfigDict`` files) and the typed ``Config``.

``memjax.config`` holds every field and its default; this module only translates:

  base_configdict()           the ConfigDict of ``Config()``: what ``configs/base.py`` returns
  load_config_file(path)      runs a ``configs/*.py`` file's ``get_config()``
  apply_overrides(raw, ...)   ``--config.<section>.<field>=TEXT`` flags, each parsed by its field's type
  config_from_dict(raw)       ConfigDict / nested dict -> ``Config`` (unknown keys and bad values raise
                              ``ConfigError`` naming the dotted field)
  config_to_dict(cfg)         ``Config`` -> a JSON-able nested dict (``config_from_dict`` inverts it)
  shape_fields / shape_mismatch   the fields that fix a checkpoint's array shapes

The dict form differs from the dataclasses in two ways: ``model.memory`` holds the fields of its
``MemoryConfig`` (``layer``) beside its own, and layer indices are strings (``"4,12,20"``,
``"centered:3"``).

Example:
  >>> raw = base_configdict()
  >>> raw.model.memory.n_keys, raw.train.steps
  (64, 1000)
  >>> cfg = config_from_dict(apply_overrides(raw, [("train.steps", "20")]))
  >>> cfg.train.steps
  20
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from memjax.config import (Config, ConfigError, LMMemoryConfig, MemoryConfig, ModelConfig, MoEConfig, PEERConfig,
                           check_int, format_layers, parse_layers)

# model.memory holds its layer's fields directly.
_FLATTENED = {(LMMemoryConfig, "layer")}
# Fields holding block indices: strings in the dict form, parsed against model.num_layers.
_LAYER_FIELDS = {(LMMemoryConfig, "layers"), (MoEConfig, "layers"), (PEERConfig, "layers")}
_NONE_TEXT = ("", "none", "None", "null")


@functools.cache
def _hints(cls) -> dict:
  """The class's resolved type hints, once per class (``get_type_hints`` re-evaluates the string
  annotations on every call: it was ~80% of building a config from a dict)."""
  return typing.get_type_hints(cls)


def _fields(cls):
  return [f for f in dataclasses.fields(cls) if f.init]


def _is_config(t) -> bool:
  return isinstance(t, type) and dataclasses.is_dataclass(t)


def _optional_of(t):
  """``X`` for a hint ``X | None`` (else None)."""
  if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(t):
      return args[0]
  return None


def schema(cls=Config) -> dict:
  """The dict form's keys: ``{key: type hint | nested schema}`` (flattened sections merged in)."""
  out = {}
  hints = _hints(cls)
  for f in _fields(cls):
    t = hints[f.name]
    if (cls, f.name) in _FLATTENED:
      out.update(schema(t))
    elif _is_config(t):
      out[f.name] = schema(t)
    elif (cls, f.name) in _LAYER_FIELDS:
      out[f.name] = str
    else:
      out[f.name] = t
  return out


def leaf_types(cls=Config, prefix: str = "") -> dict[str, Any]:
  """``{dotted key: type hint}`` of every leaf of the dict form, e.g. ``"model.memory.k": int``."""
  out = {}
  for key, t in schema(cls).items():
    dotted = f"{prefix}{key}"
    if isinstance(t, dict):
      out.update(_leaves_of(t, dotted + "."))
    else:
      out[dotted] = t
  return out


def _leaves_of(tree: dict, prefix: str) -> dict:
  out = {}
  for key, t in tree.items():
    if isinstance(t, dict):
      out.update(_leaves_of(t, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = t
  return out


# ----- dict -> Config ------------------------------------------------------------------------------


def _as_dict(node: Any, path: str) -> dict:
  if hasattr(node, "to_dict"):
    return node.to_dict()
  if isinstance(node, Mapping):
    return dict(node)
  owner, _, field = path.rpartition(".")
  raise ConfigError(owner or path, field if owner else "", node, "must be a section (a dict of fields)")


def _suggest(name: str, allowed) -> str:
  close = difflib.get_close_matches(str(name), list(allowed), n=1, cutoff=0.6)
  return f' Did you mean "{close[0]}"?' if close else ""


def _check_known(section: dict, allowed, path: str) -> None:
  unknown = sorted(set(section) - set(allowed), key=str)
  if unknown:
    name = unknown[0]
    raise ConfigError(path, str(name), rule=f"is not a known field.{_suggest(name, allowed)} "
                                             f"Allowed: {sorted(allowed)}")


def _build(cls, section: dict, path: str, num_layers: int | None, base=None):
  """``cls`` from a dict section; missing keys keep ``base``'s values (default: ``cls()``), so a nested
  config's defaults are those of the field that holds it (e.g. ``LMMemoryConfig.layer``)."""
  base = cls() if base is None else base
  hints = _hints(cls)
  _check_known(section, schema(cls), path)
  child = lambda name: name if path == "config" else f"{path}.{name}"
  if cls is ModelConfig:  # layer indices are parsed against it, before ModelConfig checks it
    num_layers = section.get("num_layers", base.num_layers)
    check_int(path, "num_layers", num_layers)
  kwargs = {}
  for f in _fields(cls):
    t, default = hints[f.name], getattr(base, f.name)
    if (cls, f.name) in _FLATTENED:
      keys = schema(t)
      kwargs[f.name] = _build(t, {k: v for k, v in section.items() if k in keys}, path, num_layers, default)
    elif _is_config(t):
      kwargs[f.name] = _build(t, _as_dict(section.get(f.name, {}), child(f.name)), child(f.name), num_layers,
                              default)
    elif f.name in section:
      value = section[f.name]
      if (cls, f.name) in _LAYER_FIELDS:
        value = parse_layers(child(f.name), value, num_layers)
      elif _optional_of(t) is str and value in _NONE_TEXT:
        value = None
      kwargs[f.name] = value
    else:
      kwargs[f.name] = default
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise e.under(path) from None


def config_from_dict(raw: Any) -> Config:
  """Typed, validated ``Config`` from a ConfigDict / nested dict (see ``configs/base.py``).

  Missing keys take ``memjax.config``'s defaults; unknown keys and bad values raise ``ConfigError``
  naming the dotted field (``model.memory.k=99 must be <= n_keys=16 ...``).
  """
  return _build(Config, _as_dict(raw, "config"), "config", None)


# ----- Config -> dict ------------------------------------------------------------------------------


def _to_dict(obj) -> dict:
  out = {}
  for f in _fields(type(obj)):
    value = getattr(obj, f.name)
    if (type(obj), f.name) in _FLATTENED:
      out.update(_to_dict(value))
    elif dataclasses.is_dataclass(value):
      out[f.name] = _to_dict(value)
    elif (type(obj), f.name) in _LAYER_FIELDS:
      out[f.name] = format_layers(value)
    else:
      out[f.name] = value
  return out


def config_to_dict(cfg: Config) -> dict:
  """A JSON-able nested dict that ``config_from_dict`` turns back into ``cfg``."""
  return _to_dict(cfg)


def base_configdict():
  """``Config()`` as an ``ml_collections.ConfigDict``: every key with its default.

  Fields that default to None are typed placeholders, so ``--config.data.text_glob=...`` parses.
  """
  import ml_collections
  from ml_collections import config_dict

  def build(values: dict, types_: dict):
    node = ml_collections.ConfigDict()
    for key, value in values.items():
      t = types_[key]
      if isinstance(t, dict):
        node[key] = build(value, t)
      elif value is None:
        node[key] = config_dict.placeholder(_optional_of(t) or str)
      else:
        node[key] = value
    return node

  return build(config_to_dict(Config()), schema(Config))


# ----- configs/*.py files and --config.<key>=TEXT overrides ------------------------------------------


def load_config_file(path: str):
  """Runs ``get_config()`` of a ``configs/*.py`` file; every failure is a one-line ``ConfigError``."""
  shown = os.fspath(path)
  if not os.path.isfile(shown):
    raise ConfigError("--config", "", shown, "is not a file (give the path of a configs/*.py file)")
  name = "memjax_config_file_" + os.path.splitext(os.path.basename(shown))[0].replace("-", "_")
  try:
    spec = importlib.util.spec_from_file_location(name, shown)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in a user's file: name it, don't trace it
    raise ConfigError("--config", "", shown, f"could not be loaded: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError("--config", "", shown, "defines no get_config() function")
  try:
    raw = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001
    raise ConfigError("--config", "", shown, f"get_config() raised {type(e).__name__}: {e}") from None
  if not (hasattr(raw, "to_dict") or isinstance(raw, Mapping)):
    raise ConfigError("--config", "", shown, f"get_config() returned {type(raw).__name__}, not a ConfigDict")
  return raw


def parse_value(flag: str, text: str, hint) -> Any:
  """``text`` as a value of the field type ``hint`` (``ConfigError`` naming ``flag`` if it is not one)."""
  inner = _optional_of(hint)
  if inner is not None:
    return None if text in _NONE_TEXT else parse_value(flag, text, inner)
  if hint is bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(flag, "", text, "must be true or false")
  if hint is int:
    try:
      return int(text)
    except ValueError:
      raise ConfigError(flag, "", text, "must be an int") from None
  if hint is float:
    try:
      return float(text)
    except ValueError:
      raise ConfigError(flag, "", text, "must be a number") from None
  return text


def apply_overrides(raw: Any, overrides: Sequence[tuple[str, str]], *, flag_prefix: str = "--config.") -> dict:
  """``raw`` (a ConfigDict or dict) as a nested dict with ``(dotted key, TEXT)`` overrides applied.

  Each TEXT is parsed by the type of the field it names; an unknown key, a key naming a whole
  section and an unparsable value raise ``ConfigError`` naming the flag
  (``--config.train.stepz: is not a known field. Did you mean "steps"? ...``).
  """
  out = _as_dict(raw, "config")
  out = {k: (_as_dict(v, k) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v) for k, v in out.items()}
  for dotted, text in overrides:
    flag = f"{flag_prefix}{dotted}"
    parts = dotted.split(".")
    node_schema: Any = schema(Config)
    node = out
    for depth, part in enumerate(parts):
      where = "config" if depth == 0 else ".".join(parts[:depth])
      if not isinstance(node_schema, dict) or part not in node_schema:
        if not isinstance(node_schema, dict):
          raise ConfigError(flag, rule=f": {'.'.join(parts[:depth])} is a field, not a section")
        raise ConfigError(flag, rule=f": not a known field ({where} has no field '{part}'."
                                     f"{_suggest(part, node_schema)} Known: {', '.join(sorted(node_schema))})")
      node_schema = node_schema[part]
      if depth < len(parts) - 1:
        if isinstance(node_schema, dict):
          child = node.get(part, {})
          node[part] = child = _as_dict(child, ".".join(parts[:depth + 1]))
          node = child
    if isinstance(node_schema, dict):
      raise ConfigError(flag, rule=f": is a section; set one of its fields, e.g. {flag}.{sorted(node_schema)[0]}=...")
    node[parts[-1]] = parse_value(flag, text, node_schema)
  return out


# ----- what fixes a checkpoint's shapes --------------------------------------------------------------


def shape_fields(cfg: Config) -> dict:
  """Flat ``{dotted field: value}`` of everything that determines the checkpoint's array shapes."""
  d = config_to_dict(cfg)
  out = {f"model.{k}": v for k, v in d["model"].items() if k not in ("memory", "moe", "peer", "dtype", "rope_theta")}
  init_only = ("key_init_scale", "value_init_std", "out_init_std")
  layer_keys = [f.name for f in _fields(MemoryConfig) if f.name not in init_only]
  for k in layer_keys + ["layers", "shared", "value_update"]:
    out[f"model.memory.{k}"] = d["model"]["memory"][k]
  for k in ("layers", "num_experts", "mlp_dim"):
    out[f"model.moe.{k}"] = d["model"]["moe"][k]
  for k in ("layers", "num_experts", "heads", "key_dim", "shared_keys", "qk_norm"):
    out[f"model.peer.{k}"] = d["model"]["peer"][k]
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
