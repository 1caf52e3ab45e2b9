"""Finetuning a trained run (``config.finetune``): where it starts from, and sparse memory finetuning.

Sparse memory finetuning ("smf", Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning"): for each value pool,
  df[m]  = number of background batches (from the pretraining data) in which slot m was read,
  tf[m]  = reads of slot m in this step's batch (every reader of the pool, every head, every token
           whose target counts in the loss),
  score  = tf * log((|B| + 1) / (df + 1)),
and only the ``top_t`` slots by score (among those read this step; ties to the lower slot) get an
update; every other value row, and every other parameter, stays bitwise as it was.

Pure functions first (``slot_reads``, ``tfidf_scores``, ``select_slots``, ``merge_model_config``),
then what touches files (``read_source``, ``load_source_params``, ``background_df``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from memjax.config import Config, ConfigError, DataConfig
from memjax.config_bridge import _leaves_of, config_from_dict, config_to_dict, shape_fields

BACKGROUND_FILE = os.path.join("finetune", "background_df.npz")


# ----- pure: reads, tf-idf, selection ------------------------------------------------------------


def slot_reads(indices, mask_BxT, num_slots: int):
  """Reads of each slot, ``[M]`` float32: every entry of ``indices`` (a list of ``[B, T, ...]`` slot
  arrays, one per reader) counts once where ``mask_BxT`` is nonzero.

  Example:
    >>> idx = jnp.array([[[0, 2], [2, 2]]])                 # [B=1, T=2, 2 reads]
    >>> slot_reads([idx], jnp.array([[1, 1]]), 4).tolist()
    [1.0, 0.0, 3.0, 0.0]
  """
  counts = jnp.zeros((num_slots,), jnp.float32)
  for idx in indices:
    b, t = idx.shape[:2]
    w = jnp.broadcast_to(mask_BxT.astype(jnp.float32).reshape(b, t, *([1] * (idx.ndim - 2))), idx.shape)
    counts = counts.at[idx.reshape(-1)].add(w.reshape(-1), mode="drop")
  return counts


def tfidf_scores(reads_M, df_M, num_background: int):
  """``tf * log((|B| + 1) / (df + 1))`` per slot (``|B|`` = ``num_background`` batches).

  Example:
    >>> [round(x, 4) for x in tfidf_scores(jnp.array([2.0, 1.0]), jnp.array([0.0, 3.0]), 3).tolist()]
    [2.7726, 0.0]
  """
  idf = jnp.log((num_background + 1.0) / (df_M.astype(jnp.float32) + 1.0))
  return reads_M.astype(jnp.float32) * idf


def select_slots(reads_M, df_M, num_background: int, top_t: int):
  """Boolean ``[M]``: the ``top_t`` slots by tf-idf among those read (``reads > 0``); equal scores
  go to the lower slot. At most ``min(top_t, M)`` are True.

  Example:
    >>> select_slots(jnp.array([1.0, 5.0, 0.0, 2.0]), jnp.array([0.0, 4.0, 0.0, 0.0]), 4, 2).tolist()
    [True, False, False, True]
  """
  m = reads_M.shape[0]
  t = min(int(top_t), m)
  score = jnp.where(reads_M > 0, tfidf_scores(reads_M, df_M, num_background), -1.0)
  _, top = jax.lax.top_k(score, t)
  chosen = jnp.zeros((m,), bool).at[top].set(True)
  return chosen & (reads_M > 0)


# ----- pure: LoRA adapters ------------------------------------------------------------------------

# Matrices that get an adapter, with how many of their leading axes are the input (contracted) side.
LORA_TARGETS = {"attn": {"wq": 1, "wk": 1, "wv": 1, "wo": 2}, "ffn": {"w_gate": 1, "w_up": 1, "w_down": 1}}


def lora_targets(model_cfg, params) -> dict:
  """``{name: (path, in_axes)}`` of the matrices adapted by "lora": every attention projection and
  the dense blocks' SwiGLU matrices (not memory layers, not MoE experts). ``name`` is the path joined
  by "/"."""
  from flax import nnx
  out = {}
  for path, _ in nnx.to_flat_state(params):
    path = tuple(path)
    if len(path) < 3 or path[0] != "blocks":
      continue
    group, leaf = path[-2], path[-1]
    if group == "ffn" and model_cfg.block_kind(int(path[1])) != "dense":
      continue
    if leaf in LORA_TARGETS.get(group, {}):
      out["/".join(map(str, path))] = (path, LORA_TARGETS[group][leaf])
  return out


def lora_init(model_cfg, params, rank: int, key) -> dict:
  """``{name: {"a": [in, r], "b": [r, out]}}``: A ~ N(0, 1/in), B = 0, so the adapted model starts as
  the base model exactly."""
  flat = {tuple(p): v for p, v in _flat_state(params)}
  out = {}
  for i, (name, (path, k)) in enumerate(sorted(lora_targets(model_cfg, params).items())):
    shape = flat[path].shape
    n_in, n_out = math.prod(shape[:k]), math.prod(shape[k:])
    a = jax.random.normal(jax.random.fold_in(key, i), (n_in, rank), jnp.float32) * n_in**-0.5
    out[name] = {"a": a, "b": jnp.zeros((rank, n_out), jnp.float32)}
  return out


def lora_merge(model_cfg, params, lora: dict):
  """``params`` with every adapted matrix ``W`` replaced by ``W + (A B)`` (reshaped to W's shape)."""
  from flax import nnx
  targets = lora_targets(model_cfg, params)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(params)}
  for name, ab in lora.items():
    path = targets[name][0]
    w = flat[path][...]
    flat[path] = flat[path].replace(w + (ab["a"] @ ab["b"]).reshape(w.shape).astype(w.dtype))
  return nnx.from_flat_state(flat)


def lora_param_count(model_cfg, rank: int) -> int:
  """Adapter parameters: ``r (in + out)`` per adapted matrix.

  Example:
    >>> from memjax.config import ModelConfig
    >>> lora_param_count(ModelConfig(dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64, vocab_size=8), 4)
    2176
  """
  c, hd, f = model_cfg.dim, model_cfg.num_heads * model_cfg.head_dim, model_cfg.mlp_dim
  dense = sum(model_cfg.block_kind(i) == "dense" for i in range(model_cfg.num_layers))
  return model_cfg.num_layers * 4 * rank * (c + hd) + dense * 3 * rank * (c + f)


def _flat_state(state):
  from flax import nnx
  return [(p, v[...]) for p, v in nnx.to_flat_state(state)]


def merge_model_config(cfg: Config, saved: Config) -> Config:
  """``cfg`` with its model taken from ``saved`` (the checkpoint's config).

  A model field ``cfg`` leaves at its default takes the saved value; one it sets (differs from the
  default) is kept, unless it is a field that fixes array shapes (``shape_fields``) and differs from
  the saved value: then ``ConfigError`` names it. ``model.vocab_size`` always comes from ``saved``.
  """
  default, now, old = (_leaves_of(config_to_dict(c)["model"], "") for c in (Config(), cfg, saved))
  shapes = {k[len("model."):] for k in shape_fields(saved)}
  merged = {}
  for key, value in old.items():
    given = now.get(key)
    if key == "vocab_size" or given == default.get(key):
      merged[key] = value
    elif key in shapes and given != value:
      owner, _, field = f"model.{key}".rpartition(".")
      raise ConfigError(owner, field, given, f"differs from {value!r} in the checkpoint of finetune.init_from: "
                                             "finetuning keeps the model's shapes (leave it unset)")
    else:
      merged[key] = given
  raw = config_to_dict(cfg)
  raw["model"] = _unflat(merged)
  return config_from_dict(raw)


def _unflat(flat: dict) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *head, last = key.split(".")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = v
  return out


def with_source_tokenizer(cfg: Config, source: "Source") -> Config:
  """``cfg`` reading its data with the tokenizer of ``source``: the ids must mean what they meant in
  training. A BPE tokenizer trained on the source's data is named by its file (``sentencepiece:PATH``),
  so the new data does not train another one. A ``data.tokenizer`` set (not the default) to another
  tokenizer raises ``ConfigError`` naming it."""
  saved, given = source.config.data.tokenizer, cfg.data.tokenizer
  if given not in (DataConfig().tokenizer, saved):
    raise ConfigError("data", "tokenizer", given,
                      f"differs from {saved!r}, the tokenizer of finetune.init_from: finetuning reads its data with "
                      "the model's tokenizer (leave it unset)")
  spec = saved
  if saved == "bpe":
    from memjax.data.pipeline import tokenizer_for
    spec = f"sentencepiece:{tokenizer_for(source.config.data)[1]}"
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))


# ----- files: the source run, the background statistics -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a finetuning run starts: ``kind`` "workdir" (latest checkpoint) or "export", its path and
  the config saved with it."""

  kind: str
  path: str
  config: Config


def read_source(init_from: str) -> Source:
  """The run ``finetune.init_from`` names; ``ConfigError`` (``finetune.init_from``) if it is none.

  Example:
    >>> read_source("runs/default").config.model.dim   # doctest: +SKIP
    128
  """
  from memjax.train.checkpoint import Checkpointer
  path = os.path.abspath(init_from)
  fail = lambda why: ConfigError("finetune", "init_from", init_from, why)
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "params")):
    with open(os.path.join(path, "config.json")) as f:
      raw = json.load(f)
    kind = "export"
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    ckpt = Checkpointer(path)
    try:
      raw = ckpt.read_config() if ckpt.latest_step() is not None else None
    finally:
      ckpt.close()
    if raw is None:
      raise fail("holds no finished checkpoint with a saved config")
    kind = "workdir"
  else:
    raise fail("is neither a workdir with checkpoints nor an export directory (config.json + params/)")
  try:
    return Source(kind, path, config_from_dict(raw))
  except ConfigError as e:
    raise fail(f"has an unreadable saved config ({e})") from None


def load_source_params(source: Source, mesh, value_sharding: str):
  """``(params, values)`` of ``source`` laid out on ``mesh``: exactly the saved arrays (of a LoRA
  finetuning run: its matrices with the adapters folded in, as its export holds them).

  Example:
    >>> params, values = load_source_params(read_source("runs/default"), mesh, "column")  # doctest: +SKIP
  """
  import orbax.checkpoint as ocp
  from flax import nnx

  from memjax import sharding
  from memjax.model import LM, split_model
  from memjax.train.checkpoint import Checkpointer
  from memjax.train.step import jit_steps, make_step_fns, with_shardings

  cfg = source.config
  if source.kind == "export":
    rules = sharding.axis_rules(value_sharding)
    _, params, values = split_model(nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0))))
    target = {"params": with_shardings(params, sharding.state_shardings(params, mesh, rules)),
              "values": with_shardings(values, sharding.state_shardings(values, mesh, rules))}
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(os.path.join(source.path, "params"), target)
    return restored["params"], restored["values"]
  steps = jit_steps(make_step_fns(cfg.model, cfg.train, finetune=cfg.finetune), mesh, value_sharding)
  ckpt = Checkpointer(source.path)
  try:
    state, _, _ = ckpt.restore(with_shardings(steps.abstract_state, steps.state_sharding))
  finally:
    ckpt.close()
  if steps.fns.merged_params is not None:  # a LoRA run: its adapters folded into the matrices
    return jax.jit(steps.fns.merged_params)(state), state["values"]
  return state["params"], state["values"]


def background_df(steps, state, batches, num_slots: int) -> dict:
  """``{pool key: df [M] float32}``: in how many of ``batches`` (global batches) each slot was read
  (by a token whose target counts in the loss). Runs under one jit with replicated outputs, so every
  process of a multi-process run gets the same counts.

  Example:
    >>> df = background_df(steps, state, [batch1, batch2], 4096)   # doctest: +SKIP
  """
  from memjax import sharding
  pools = steps.fns.pools

  def read_once(state, batch):
    lookups = steps.fns.eval_step(state, batch)["lookups"]
    return {p.key: (slot_reads([lookups[j][0] for j in p.readers], batch["loss_mask"], num_slots) > 0
                    ).astype(jnp.float32) for p in pools}

  rep = sharding.replicated(steps.mesh)
  fn = jax.jit(read_once, in_shardings=(steps.state_sharding, steps.batch_sharding), out_shardings=rep)
  df = {p.key: np.zeros((num_slots,), np.float32) for p in pools}
  for batch in batches:
    for key, seen in fn(state, batch).items():
      df[key] += np.asarray(seen)
  return df


def check_finetune(cfg: Config) -> None:
  """Refuses finetuning settings the (merged) model cannot run, naming the field."""
  ft = cfg.finetune
  if ft.method in ("memory", "smf") and not cfg.model.memory.layers:
    raise ConfigError("finetune", "method", ft.method, "trains memory slots: the model of finetune.init_from has "
                                                         "no memory layers (use 'full')")
  if ft.method is not None and cfg.train.microbatches != 1:
    raise ConfigError("train", "microbatches", cfg.train.microbatches, "must be 1 with finetune.method set")


def start_from_source(cfg: Config, source: Source, steps, workdir: str):
  """The first state of a finetuning run: the source's parameters, a fresh optimizer state and, for
  "smf", the background document frequencies (computed over ``finetune.background_batches`` batches of
  the source run's own data, or read back from ``<workdir>/finetune/background_df.npz``)."""
  params, values = load_source_params(source, steps.mesh, cfg.model.memory.value_sharding)
  state = steps.start(params, values)
  ft = cfg.finetune
  if ft.method != "smf":
    return state
  keys = [p.key for p in steps.fns.pools]
  df = load_background(workdir, ft.background_batches, keys)
  if df is None:
    from memjax.data import make_pipeline
    from memjax.train.evaluate import global_batch
    tc, nproc = cfg.train, jax.process_count()
    pipe = make_pipeline(source.config.data, seq_len=tc.seq_len, batch_size=tc.batch_size // nproc,
                         process_index=jax.process_index(), process_count=nproc)
    batches = (global_batch(next(pipe.train), steps, tc.batch_size) for _ in range(ft.background_batches))
    df = background_df(steps, state, batches, cfg.model.memory.layer.num_slots)
    save_background(workdir, df, ft.background_batches)
  stats = {k: jax.device_put(jnp.asarray(df[k]), steps.state_sharding["stats"][k]) for k in keys}
  return {**state, "stats": stats}


def save_background(workdir: str, df: dict, num_batches: int) -> None:
  """Writes ``<workdir>/finetune/background_df.npz`` (atomically; process 0 only)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, BACKGROUND_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp{os.getpid()}.npz"
  keys = sorted(df)
  np.savez(tmp, num_batches=np.int64(num_batches), keys=np.array(keys),
           **{f"df_{i}": df[k] for i, k in enumerate(keys)})
  os.replace(tmp, path)


def load_background(workdir: str, num_batches: int, keys) -> dict | None:
  """The saved document frequencies if they were computed over ``num_batches`` for these pools."""
  path = os.path.join(workdir, BACKGROUND_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    saved = [str(k) for k in z["keys"]]
    if int(z["num_batches"]) != num_batches or sorted(keys) != saved:
      return None
    return {k: np.asarray(z[f"df_{i}"]) for i, k in enumerate(saved)}
