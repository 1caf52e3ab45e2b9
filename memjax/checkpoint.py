"""Orbax checkpoints: the full train state (sharded), the data-iterator state and the config.

Layout of a workdir:
  checkpoints/<step>/state    model parameters, value tables, optimizer states, step (sharded arrays)
  checkpoints/<step>/data     the data iterator's state (JSON), for an exact resume
  checkpoints/<step>/config   the run's config (JSON)
  export/                     ``export_params``: parameters and config only, for inference

Restoring takes an abstract target whose leaves carry the shardings wanted *now*, so a checkpoint
written on one mesh restores onto any other (1 device -> 8, column -> row, ...).

Crash safety. Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which the next ``Checkpointer``
removes (``cleanup_tmp_directories``). A step that exists but cannot be read (truncated or corrupted
files) is moved by ``quarantine`` to ``<workdir>/checkpoints.damaged/`` so the run can fall back to
the step before it and later save that step number again.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying ``shardings`` (a prefix tree of NamedShardings) for restore targets."""
  def one(sharding, subtree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree)
  return jax.tree.map(one, shardings, abstract_tree, is_leaf=lambda x: isinstance(x, NamedSharding))


class Checkpointer:
  """Saves and restores train states under ``<workdir>/checkpoints`` with an Orbax CheckpointManager.

  Example:
    >>> ckpt = Checkpointer("/tmp/run", max_to_keep=3)          # doctest: +SKIP
    >>> ckpt.save(100, state, data_state={...}, config={...})    # doctest: +SKIP
    >>> state, data_state, config = ckpt.restore(abstract_state) # doctest: +SKIP
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_directory = os.path.abspath(os.path.join(workdir, "checkpoints.damaged"))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def stray_step_dirs(self) -> list[str]:
    """Numbered entries of the checkpoint directory that Orbax does not list as finished steps."""
    if not os.path.isdir(self.directory):
      return []
    known = {str(s) for s in self.manager.all_steps()}
    return sorted(name for name in os.listdir(self.directory) if name.isdigit() and name not in known)

  def quarantine(self, step: int) -> str:
    """Moves an unreadable step to ``<workdir>/checkpoints.damaged/<step>-<time>``; returns the new path."""
    os.makedirs(self.damaged_directory, exist_ok=True)
    target = os.path.join(self.damaged_directory, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"memjax_quarantine_{step}")
    self.manager.reload()
    return target

  def save(self, step: int, state, *, data_state: Any = None, config: dict | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state or None, config or None) at ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    for name in ("data", "config"):
      if os.path.isdir(os.path.join(self.directory, str(step), name)):
        items[name] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored.get("data"), restored.get("config")

  def read_config(self, step: int | None = None) -> dict | None:
    """The config JSON saved with ``step`` (latest by default), read without touching arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.directory, str(step), "config", "metadata")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def close(self) -> None:
    self.manager.close()


# ----- inference export ---------------------------------------------------------------------------


def export_params(path: str, params: nnx.State, values: nnx.State, config: dict) -> None:
  """Writes a parameters-only checkpoint (no optimizer state) with its config to ``path``.

  Call it on every process of a multi-process run (the array save is collective).
  """
  path = os.path.abspath(path)
  primary = jax.process_index() == 0
  if primary and os.path.isdir(path):  # temporaries of an export killed mid-write
    import shutil
    for name in os.listdir(path):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), {"params": params, "values": values}, force=True)
  if primary:
    tmp = os.path.join(path, f".config.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump(config, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, "config.json"))


def load_exported(path: str, mesh=None, *, backend: str = "auto"):
  """Restores an ``export_params`` checkpoint as an ``LM`` on ``mesh`` (default: one device).

  Returns ``(model, config)``; the arrays are laid out by the logical axis rules for that mesh.

  Example:
    >>> model, cfg = load_exported("runs/default/export")      # doctest: +SKIP
    >>> logits, _ = model(tokens)                               # doctest: +SKIP
  """
  from memjax import sharding
  from memjax.run_config import config_from_json
  from memjax.model import LM
  from memjax.train_lib import split_model

  path = os.path.abspath(path)
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  cfg = config_from_json(raw)
  if mesh is None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "memory": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(cfg.model.memory.value_sharding)
  abstract = nnx.eval_shape(lambda: LM(cfg.model, backend=backend, rngs=nnx.Rngs(0)))
  graphdef, params, values = split_model(abstract)
  target = {"params": abstract_with_shardings(params, sharding.state_shardings(params, mesh, rules)),
            "values": abstract_with_shardings(values, sharding.state_shardings(values, mesh, rules))}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(path, "params"), target)
  return nnx.merge(graphdef, restored["values"], restored["params"]), cfg
