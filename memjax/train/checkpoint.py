"""Orbax checkpoints: save, restore, export, and the restore policy (fallback, quarantine, refusal).

Layout of a workdir:
  checkpoints/<step>/state    model parameters, value tables, optimizer states, step (sharded arrays)
  checkpoints/<step>/data     the data iterator's state (JSON), for an exact resume
  checkpoints/<step>/config   the run's config (JSON)
  export/                     ``export_params``: parameters and config only, for inference

Restoring takes an abstract target whose leaves carry the shardings wanted *now*, so a checkpoint
written on one mesh restores onto any other (1 device -> 8, column -> row, ...).

Restore policy (``restore_latest_good``): the newest readable step wins; a step written for other
model shapes is refused naming the fields; unreadable newer steps are moved to
``checkpoints.damaged/``; a workdir with step directories but no readable step is refused rather
than silently restarted from step 0.

Crash safety. Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which the next ``Checkpointer``
removes (``cleanup_tmp_directories``). A step that exists but cannot be read (truncated or corrupted
files) is moved by ``quarantine`` to ``<workdir>/checkpoints.damaged/`` so the run can fall back to
the step before it and later save that step number again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from memjax.config import Config
from memjax.config_bridge import config_from_dict, shape_mismatch
from memjax.train.errors import TrainingError
from memjax.train.step import with_shardings


class Checkpointer:
  """Saves and restores train states under ``<workdir>/checkpoints`` with an Orbax CheckpointManager.

  Example:
    >>> ckpt = Checkpointer("/tmp/run", max_to_keep=3)          # doctest: +SKIP
    >>> ckpt.save(100, state, data_state={...}, config={...})    # doctest: +SKIP
    >>> state, data_state, config = ckpt.restore(abstract_state) # doctest: +SKIP
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, asynchronous: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_directory = os.path.abspath(os.path.join(workdir, "checkpoints.damaged"))
    self.asynchronous = asynchronous
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=asynchronous,
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

  def save(self, step: int, state, *, data_state: Any = None, config: dict | None = None, wait: bool = True) -> None:
    """Saves ``step``. With ``asynchronous`` and ``wait=False`` the files are written in the background
    (the step counts only once finalised; ``wait()`` or the next save waits for it). Orbax moves the
    arrays to host memory before this returns (on CPU a view that PJRT keeps from being donated), so
    the next train step may donate the state's buffers."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait or not self.asynchronous:
      self.manager.wait_until_finished()

  def wait(self) -> None:
    """Waits for a background save to be finalised (a no-op for synchronous checkpoints)."""
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


# ----- the restore policy ---------------------------------------------------------------------------


def first_line(e: BaseException, limit: int = 200) -> str:
  """The first line of an exception's message (TensorStore's details cut), at most ``limit`` chars."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
  return text if len(text) <= limit else text[:limit] + "..."


def restore_latest_good(ckpt: Checkpointer, cfg: Config, abstract_state):
  """``(step, state, data_state)`` of the newest readable checkpoint, or None for an empty workdir.

  Steps are tried newest first. A step written for other model shapes raises ``TrainingError`` naming
  the fields (resuming it would be wrong, not merely impossible). An unreadable step (truncated or
  corrupted files) is reported on stderr; once an older step restores, the newer unreadable ones are
  moved to ``checkpoints.damaged/``. If no step is readable, or numbered directories exist that Orbax
  does not recognise, the run is refused rather than silently restarted from step 0.

  With several processes every decision is agreed: a step counts as readable only if it restored on
  every process (each reads its own shards, so a damaged file may fail on one process alone), and
  all processes fall back to the same step.
  """
  from memjax.train import distributed
  steps = ckpt.all_steps()
  stray = ckpt.stray_step_dirs()
  if not steps:
    if stray:
      raise TrainingError(f"{ckpt.directory} holds step directories {stray} that are not finished "
                          "checkpoints; move the workdir aside (or delete it) to start over")
    return None
  damaged: list[tuple[int, str]] = []
  for step in reversed(steps):
    try:
      saved = ckpt.read_config(step)
    except (OSError, ValueError) as e:
      damaged.append((step, f"config: {first_line(e)}"))
      print(f"warning: checkpoint step {step} is unreadable ({damaged[-1][1]})", file=sys.stderr, flush=True)
      continue
    if saved is not None:
      diff = shape_mismatch(saved, cfg)
      if diff:
        raise TrainingError(f"workdir {os.path.dirname(ckpt.directory)} holds a run with other model "
                            f"shapes (checkpoint step {step}); differing fields: " + "; ".join(diff))
    try:
      state, data_state, _ = ckpt.restore(abstract_state, step)
      error = None
    except Exception as e:  # noqa: BLE001 - TensorStore raises bare Exception on damaged files
      error = first_line(e)
    if not distributed.agree(error is None):
      damaged.append((step, error or "unreadable on another process"))
      print(f"warning: checkpoint step {step} is unreadable ({damaged[-1][1]})", file=sys.stderr, flush=True)
      continue
    for bad, _ in damaged:
      moved = ckpt.quarantine(bad)
      print(f"warning: falling back from unreadable checkpoint step {bad} to step {step}; "
            f"moved step {bad} to {moved}", file=sys.stderr, flush=True)
    return step, state, data_state
  raise TrainingError(f"no checkpoint in {ckpt.directory} is readable (steps {steps}; newest: "
                      f"{damaged[0][1]}); move the workdir aside (or delete it) to start over")


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


def load_exported(path: str, mesh=None, *, backend: str | None = None):
  """Restores an ``export_params`` checkpoint as an ``LM`` on ``mesh`` (default: one device).

  Returns ``(model, config)``; the arrays are laid out by the logical axis rules for that mesh.
  ``backend`` overrides the saved ``model.memory.backend``.

  Example:
    >>> model, cfg = load_exported("runs/default/export")      # doctest: +SKIP
    >>> logits, _ = model(tokens)                               # doctest: +SKIP
  """
  import dataclasses

  from memjax import sharding
  from memjax.model import LM, merge_model, split_model

  path = os.path.abspath(path)
  with open(os.path.join(path, "config.json")) as f:
    cfg = config_from_dict(json.load(f))
  if backend is not None:
    memory = dataclasses.replace(cfg.model.memory, backend=backend)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory=memory))
  if mesh is None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "memory": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(cfg.model.memory.value_sharding)
  abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, params, values = split_model(abstract)
  target = {"params": with_shardings(params, sharding.state_shardings(params, mesh, rules)),
            "values": with_shardings(values, sharding.state_shardings(values, mesh, rules))}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(path, "params"), target)
  return merge_model(graphdef, restored["params"], restored["values"]), cfg
