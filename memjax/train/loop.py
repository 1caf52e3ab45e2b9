"""The training loop: data -> sharded state -> jitted step -> logs, evaluation, checkpoints.

``run(config, workdir)`` is what ``train.py`` calls; tests and notebooks call it too. It
  1. checks the workdir is writable and builds the data pipeline (the tokenizer fixes the vocabulary);
  2. builds the mesh (``config.mesh``) and the state's shardings from the logical axis rules;
  3. restores the latest readable checkpoint of the workdir (refusing one written for other shapes,
     falling back past damaged steps) or initialises the state sharded (eval_shape -> shardings ->
     jit(init)), and drops the log records the restored step does not account for;
  4. runs the step jitted once with explicit shardings and a donated state, reading step N-1's
     metrics after dispatching step N;
  5. logs to ``metrics.jsonl``, TensorBoard and a progress bar; evaluates every ``eval_every`` steps;
     checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM / SIGINT;
  6. exports a parameters-only checkpoint to ``<workdir>/export`` at the end.

Resume semantics: re-running the same command after any interruption (kill -9 included) continues
from the last finished checkpoint, with the saved data-iterator state, so losses and parameters are
those of a run never interrupted. ``metrics.jsonl`` then keeps only records with ``step <=`` the
restored step (the killed attempt's later records are replayed), and TensorBoard purges its later
events (``purge_step``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from memjax import sharding
from memjax.config import Config, ConfigError
from memjax.config_bridge import config_to_dict
from memjax.train.checkpoint import Checkpointer, export_params, restore_latest_good
from memjax.train import distributed
from memjax.train.errors import Interrupted, TrainingError
from memjax.train.evaluate import evaluate, global_batch
from memjax.train.step import jit_steps, make_step_fns, with_shardings


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and proves it writable, or raises ``ConfigError`` naming it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError("--workdir", "", workdir, f"is not writable: {e.strerror or e}") from None


def truncate_log(path: str, step: int, *, drop_final_eval: bool = False) -> int:
  """Keeps the ``metrics.jsonl`` records of steps ``<= step``; returns how many lines were dropped.

  A resumed run replays the steps after its checkpoint, so a killed attempt's records past it would
  otherwise appear twice. Torn lines (a kill mid-write) are dropped too. ``drop_final_eval`` also drops
  the evaluation records at ``step`` itself (a finished run re-evaluates when re-run). The file is
  replaced atomically, so a kill during the truncation leaves the old file.
  """
  if not os.path.exists(path):
    return 0
  keep, dropped, torn_end = [], 0, False
  with open(path) as f:
    for line in f:
      torn_end = not line.endswith("\n")
      try:
        record = json.loads(line)
        s = int(record["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if s > step or (drop_final_eval and s == step and "loss" not in record):
        dropped += 1
        continue
      keep.append(line if line.endswith("\n") else line + "\n")
  if dropped or torn_end:  # also a whole last record missing its newline: the next append would join it
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return dropped


class _Logger:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool, start: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        tb_dir = os.path.join(workdir, "tb")
        # Events of a killed attempt past the restored step are hidden from TensorBoard.
        self.tb = SummaryWriter(tb_dir, purge_step=start + 1 if os.path.isdir(tb_dir) else None)
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self.tb = None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, float, int)) and not isinstance(v, bool)
                 else v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")
    if self.tb is not None:
      for k, v in clean.items():
        if k != "step" and isinstance(v, float):
          self.tb.add_scalar(k, v, int(record["step"]))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


@dataclasses.dataclass
class RunResult:
  """What ``run`` returns: the step reached, the last metrics (training and evaluation), the workdir."""

  step: int
  metrics: dict
  workdir: str


PROCESS_COUNT_CHANGE = ("refuse", "restart_data")


def run(cfg: Config, workdir: str, *, progress: bool = True, max_steps: int | None = None,
        process_count_change: str = "refuse") -> RunResult:
  """Trains (or resumes) ``cfg`` in ``workdir`` until ``cfg.train.steps`` (or ``max_steps`` this call).

  Resuming a checkpoint written by another number of processes: ``process_count_change="refuse"``
  raises ``ConfigError`` (the data position of each process cannot be carried over exactly);
  ``"restart_data"`` restores the model and optimizer exactly and restarts every process's data
  iterator at the beginning of its new shard (``train.py --reshard_data``).

  The mesh is set with ``jax.set_mesh`` for the whole run, so memory reads run under
  ``jax.shard_map`` (each device reads only its part of the value table; see ``sharded_memory_read``).

  Example:
    >>> from memjax.config_bridge import config_from_dict, load_config_file   # doctest: +SKIP
    >>> run(config_from_dict(load_config_file("configs/tiny.py")), "runs/tiny")  # doctest: +SKIP
  """
  if process_count_change not in PROCESS_COUNT_CHANGE:
    raise ValueError(f"process_count_change={process_count_change!r}; allowed: {list(PROCESS_COUNT_CHANGE)}")
  mesh = sharding.make_mesh(cfg.mesh.resolve(jax.device_count()))
  with jax.set_mesh(mesh):
    return _run(cfg, workdir, mesh, progress=progress, max_steps=max_steps,
                process_count_change=process_count_change)


def restore_data_position(pipe, saved, nproc: int, pidx: int, *, step: int, directory: str,
                          process_count_change: str) -> None:
  """Sets this process's data iterator to its saved position.

  ``saved`` is the checkpoint's ``data`` item: ``{"process_count": n, "states": [one per process]}``
  (or, from checkpoints of memjax before it saved every process's state, one bare state: valid for
  one process only).
  """
  if isinstance(saved, dict) and "states" in saved:
    states = saved["states"]
  else:
    states = [saved] if nproc == 1 else None
  if states is not None and len(states) == nproc:
    pipe.train.set_state(states[pidx])
    return
  was = len(states) if states is not None else "several (an older checkpoint that kept process 0's only)"
  if process_count_change == "refuse":
    raise ConfigError("--num_processes", "", nproc,
                      f"differs from checkpoint step {step} in {directory}, written by {was} processes: each "
                      "process's data position cannot be carried over exactly. Restart with the same number of "
                      "processes, or pass --reshard_data to restart the data iterators (model and optimizer "
                      "restore exactly)")
  print(f"warning: checkpoint step {step} was written by {was} processes, this run has {nproc}: model and "
        "optimizer restored exactly; every process's data iterator restarts at the beginning of its new shard",
        file=sys.stderr, flush=True)


def _run(cfg: Config, workdir: str, mesh, *, progress: bool, max_steps: int | None,
         process_count_change: str) -> RunResult:
  from memjax.data import make_pipeline

  workdir = os.path.abspath(workdir)
  tc = cfg.train
  nproc, pidx = jax.process_count(), jax.process_index()
  if tc.batch_size % nproc:
    raise ConfigError("train", "batch_size", tc.batch_size, f"must be divisible by the {nproc} processes")
  sizes = cfg.mesh.resolve(jax.device_count())
  check_memory_mesh(cfg, sizes)
  batch_shards = sizes["data"] * sizes["fsdp"]
  if tc.batch_size % batch_shards:
    raise ConfigError("train", "batch_size", tc.batch_size,
                      f"must be divisible by mesh.data * mesh.fsdp = {batch_shards}")
  if (tc.batch_size // tc.microbatches) % batch_shards:
    raise ConfigError("train", "microbatches", tc.microbatches,
                      f"leaves {tc.batch_size // tc.microbatches} rows per microbatch, which must be divisible by "
                      f"mesh.data * mesh.fsdp = {batch_shards}")
  source = None
  if cfg.finetune.init_from is not None:  # before anything is written: the model comes from there
    from memjax.train.finetune import check_finetune, merge_model_config, read_source, with_source_tokenizer
    source = read_source(cfg.finetune.init_from)
    cfg = with_source_tokenizer(merge_model_config(cfg, source.config), source)
    check_finetune(cfg)
  created = not os.path.exists(workdir)
  check_workdir(workdir)
  try:
    if nproc > 1:  # process 0 prepares the data (once, into a shared data_dir) before the others read it
      if pidx == 0:
        from memjax.data.pipeline import prepare_data, tokenizer_for
        tokenizer_for(cfg.data, prepare_data(cfg.data))
      distributed.barrier("memjax_data_prepared")
    pipe = make_pipeline(cfg.data, seq_len=tc.seq_len, batch_size=tc.batch_size // nproc,
                         qa_jsonl=cfg.eval.qa_jsonl, process_index=pidx, process_count=nproc)
    if source is not None and pipe.tokenizer.vocab_size != cfg.model.vocab_size:
      raise ConfigError("data", "tokenizer", cfg.data.tokenizer,
                        f"gives a vocabulary of {pipe.tokenizer.vocab_size} ids; the model of finetune.init_from "
                        f"has {cfg.model.vocab_size}: use the tokenizer it was trained with")
  except ValueError:  # bad data input (DataError): leave no trace of a workdir this run created
    if created and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)
    raise
  cfg = cfg.with_vocab(pipe.tokenizer.vocab_size)  # the tokenizer decides (model.vocab_size is for the planner)
  steps = jit_steps(make_step_fns(cfg.model, tc, finetune=cfg.finetune), mesh, cfg.model.memory.value_sharding)

  ckpt = Checkpointer(workdir, max_to_keep=tc.max_checkpoints, asynchronous=tc.async_checkpoint)
  config_json = config_to_dict(cfg)
  try:
    restored = restore_latest_good(ckpt, cfg, with_shardings(steps.abstract_state, steps.state_sharding))
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    start, state, data_state = restored
    if data_state is not None:
      try:
        restore_data_position(pipe, data_state, nproc, pidx, step=start, directory=ckpt.directory,
                              process_count_change=process_count_change)
      except BaseException:
        ckpt.close()
        raise
    print(f"resumed from {ckpt.directory}/{start}", flush=True)
  elif source is not None:
    from memjax.train.finetune import start_from_source
    start = 0
    state = start_from_source(cfg, source, steps, workdir)
    print(f"finetuning from {source.path} ({source.kind}), method {cfg.finetune.method or 'train'}", flush=True)
  else:
    start = 0
    state = steps.init(tc.seed)
  if pidx == 0:
    truncate_log(os.path.join(workdir, "metrics.jsonl"), start, drop_final_eval=start >= tc.steps)
  logger = _Logger(workdir, enabled=(pidx == 0), start=start)

  saved: list[int] = []

  def save(step_now: int, state_now, *, wait: bool = True) -> None:
    """Checkpoints ``step_now``; ``wait=False`` lets an asynchronous checkpoint finish in the background."""
    if saved and saved[-1] == step_now:  # e.g. a stop request at a checkpoint step: saved already
      if wait:
        finished(step_now)
      return
    saved.append(step_now)
    try:
      # Every process's own data position (each reads its own shard): gathered, saved by process 0.
      states = distributed.allgather_json(pipe.train.get_state())
      ckpt.save(step_now, state_now, data_state={"process_count": nproc, "states": states}, config=config_json,
                wait=wait)
    except Exception as e:  # Orbax may wrap the OSError (disk full, permissions) of a failed write
      raise_save_error(e, saved[-2] if len(saved) > 1 and tc.async_checkpoint else step_now)

  def finished(step_now: int) -> None:
    try:
      ckpt.wait()
    except Exception as e:  # noqa: BLE001
      raise_save_error(e, step_now)

  def raise_save_error(e: BaseException, step_now: int) -> None:
    cause = _os_error_in(e)
    if cause is None:
      raise e
    raise TrainingError(f"saving the checkpoint of step {step_now} failed ({cause.strerror or cause}); "
                        f"earlier checkpoints in {ckpt.directory} are intact") from None

  received: list[int] = []

  def on_signal(signum, frame):
    received.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

  old_handlers = {}
  # Several processes stop together: JAX's preemption sync manager (SIGTERM to any of them, and
  # SIGINT, which ``distributed`` turns into SIGTERM) names one step for all; see ``stop_requested``.
  if threading_is_main() and nproc == 1:
    for sig in (signal.SIGTERM, signal.SIGINT):
      old_handlers[sig] = signal.signal(sig, on_signal)

  end = tc.steps if max_steps is None else min(tc.steps, start + max_steps)
  tokens_per_step = tc.batch_size * tc.seq_len
  bar = None
  if progress and pidx == 0:
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               file=sys.stdout, mininterval=1.0)
  last: dict = {}
  try:
    pending = None  # (step, metrics) of the step dispatched last
    t_last, step_last = time.perf_counter(), start
    for step in range(start, end):
      batch = global_batch(next(pipe.train), steps, tc.batch_size)
      state, metrics = steps.train(state, batch)
      if pending is not None:
        last = _handle_metrics(pending, tc, logger, bar)
      pending = (step + 1, metrics)
      done = step + 1
      if done % tc.log_every == 0 or done == end:
        now = time.perf_counter()
        rate = (done - step_last) * tokens_per_step / max(now - t_last, 1e-9)
        t_last, step_last = now, done
        pending = (done, {**pending[1], "tokens_per_s": rate, "_log": True})
      if tc.eval_every and done % tc.eval_every == 0 and done != end:
        last = _handle_metrics(pending, tc, logger, bar)
        pending = None
        ev = evaluate(cfg, steps, state, pipe)
        logger.write({"step": done, **ev})
      if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != end:
        if pending is not None:
          last = _handle_metrics(pending, tc, logger, bar)
          pending = None
        save(done, state, wait=False)
      stop = received[0] if received else (distributed.stop_requested(done) if nproc > 1 else None)
      if stop is not None:
        if pending is not None:
          last = _handle_metrics(pending, tc, logger, bar)
        save(done, state)
        raise Interrupted(stop, done)
    if pending is not None:
      last = _handle_metrics(pending, tc, logger, bar)
    final_step = int(jax.device_get(state["step"]))
    if final_step > start or ckpt.latest_step() is None:
      save(final_step, state)
    if final_step >= tc.steps:
      ev = evaluate(cfg, steps, state, pipe)
      logger.write({"step": final_step, **ev})
      last = {**last, **ev}
      # Every process takes part: Orbax's save of sharded arrays is collective (process 0 alone would
      # wait for the others forever); process 0 alone writes config.json.
      merged = steps.fns.merged_params  # "lora": the base with its adapters folded in
      params_out = state["params"] if merged is None else jax.jit(merged)(state)
      export_params(os.path.join(workdir, "export"), params_out, state["values"], config_json)
      if pidx == 0:  # the export is self-contained: generation needs no data directory
        pipe.tokenizer.save(os.path.join(workdir, "export", "tokenizer"))
    return RunResult(final_step, last, workdir)
  finally:
    if bar is not None:
      bar.close()
    for sig, handler in old_handlers.items():
      signal.signal(sig, handler)
    logger.close()
    ckpt.close()


def check_memory_mesh(cfg: Config, sizes: dict) -> None:
  """Refuses value tables the ``memory`` mesh axis cannot split evenly (before anything is traced)."""
  mem, m = cfg.model.memory, sizes["memory"]
  if not mem.layers or m == 1:
    return
  if mem.value_sharding == "column" and mem.layer.value_dim % m:
    raise ConfigError("model.memory", "value_dim", mem.layer.value_dim,
                      f"must be divisible by mesh.memory={m} with model.memory.value_sharding='column' (or use 'row')")
  if mem.value_sharding == "row" and mem.layer.num_slots % m:
    raise ConfigError("model.memory", "n_keys", mem.layer.n_keys,
                      f"gives n_keys**2={mem.layer.num_slots} slots, which must be divisible by mesh.memory={m} "
                      "with model.memory.value_sharding='row'")


def _os_error_in(e: BaseException | None) -> OSError | None:
  """The first ``OSError`` in ``e``'s chain of causes, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _handle_metrics(pending, tc, logger: _Logger, bar) -> dict:
  step, metrics = pending
  host = {k: (float(v) if k != "_log" else v) for k, v in jax.device_get(metrics).items()}
  if not host.get("finite", 1.0):
    if tc.nan_policy == "stop":
      raise TrainingError(f"non-finite loss or gradient at step {step} (loss={host['loss']}); stopped "
                          "before saving it: the last checkpoint is intact (train.nan_policy='skip' skips such steps)")
  if bar is not None:
    bar.update(step - bar.n)
    if "tokens_per_s" in host:
      bar.set_postfix(loss=f"{host['loss']:.3f}", tok_s=f"{host['tokens_per_s']:,.0f}", refresh=False)
  if host.pop("_log", False):
    record = {"step": step, **{k: host[k] for k in ("loss", "ce", "moe_loss", "grad_norm", "value_grad_norm",
                                                   "lr", "value_lr", "tokens_per_s", "slots_updated") if k in host}}
    if not host.get("finite", 1.0):
      record["skipped"] = True
    logger.write(record)
  return host
