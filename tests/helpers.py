"""Helpers shared by the test modules: tiny configs, train.py command lines, reading a workdir back."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from configs import tiny
from memjax.config_bridge import config_from_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")
CONFIGS = os.path.join(REPO, "configs")


def tiny_raw(data_dir=None, **train):
  """``configs/tiny.py`` as a ConfigDict, its data in ``data_dir`` and ``train`` fields replaced."""
  c = tiny.get_config()
  if data_dir is not None:
    c.data.data_dir = str(data_dir)
  for k, v in train.items():
    c.train[k] = v
  return c


def tiny_config(data_dir=None, **train):
  """``tiny_raw`` as a typed ``Config``."""
  return config_from_dict(tiny_raw(data_dir, **train))


def train_py(*flags: str, config: str | None = "tiny", data_dir=None, workdir=None) -> list[str]:
  """A ``python train.py`` command line: ``--config=configs/<config>.py`` unless ``config`` is None
  (the README's form, the default config), then the data dir, the workdir and ``flags``."""
  cmd = [sys.executable, TRAIN_PY]
  if config is not None:
    cmd.append(f"--config={os.path.join(CONFIGS, config + '.py')}")
  if data_dir is not None:
    cmd.append(f"--config.data.data_dir={data_dir}")
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  return cmd + list(flags)


def subprocess_env(**extra) -> dict:
  """This environment plus the suite's persistent compile cache (shared with subprocesses); an
  ``XLA_FLAGS`` in ``extra`` is added to this process's flags (the suite's, tests/conftest.py)."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache"))
  if "XLA_FLAGS" in extra:
    extra["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra['XLA_FLAGS']}".strip()
  env.update(extra)
  return env


def _without_xla_flag(env: dict, flag: str) -> dict:
  """``env`` with every ``XLA_FLAGS`` entry starting with ``flag`` removed (the others stay)."""
  return {**env, "XLA_FLAGS": " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag))}


def without_device_count(env: dict) -> dict:
  """``env`` with no fake-device count in ``XLA_FLAGS`` (for processes that set theirs with
  ``--num_cpu_devices``); the suite's other flags stay."""
  return _without_xla_flag(env, "--xla_force_host_platform_device_count")


def aot_env(**extra) -> dict:
  """The environment of an accelerator compiler's process (deviceless AOT): ``os.environ`` without the
  suite's CPU-only compile flag (tests/conftest.py), plus ``extra``."""
  return {**_without_xla_flag(dict(os.environ), "--xla_backend_optimization_level"), **extra}


def one_error_line(stderr: str) -> str:
  """The single ``error: ...`` line of a bad-input exit (fails if there are more lines or a traceback)."""
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
  return lines[0]


def records(workdir) -> list[dict]:
  """Every record of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def logged_losses(workdir) -> dict[int, float]:
  """``{step: loss}`` of the training records; fails if a step was logged twice."""
  train = [r for r in records(workdir) if "loss" in r]
  steps = [int(r["step"]) for r in train]
  assert len(steps) == len(set(steps)), f"duplicate step records: {steps}"
  return {int(r["step"]): r["loss"] for r in train}


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def checkpoint_tree(workdir, step: int | None = None):
  """The saved train state of ``step`` (default: the newest) as a tree of numpy arrays, whatever mesh
  or number of processes wrote it."""
  import logging

  import orbax.checkpoint as ocp
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  logging.getLogger("absl").setLevel(logging.ERROR)  # "metadata file does not exist" for a subdirectory item
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return c.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def checkpoint_leaves(workdir, step: int | None = None) -> list[np.ndarray]:
  return jax.tree.leaves(checkpoint_tree(workdir, step))


def orbax_tmp_dirs(path) -> list[str]:
  """Orbax's temporary directories (a save in progress or killed mid-write) under ``path``."""
  return [n for n in os.listdir(path) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(path) else []


def random_batch(seed: int, b: int, t: int, vocab: int, *, repeat: bool = False) -> dict:
  """A batch of random tokens in the data contract (one segment per row)."""
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  if repeat:
    tok[:, 3] = tok[:, 1]  # repeated tokens -> repeated slots across positions
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def launch_train_processes(flags: list[str], workdir, *, processes: int = 2, devices_per_process: int = 4,
                           cwd=None) -> list:
  """Starts ``processes`` ``train.py`` processes of one run (``jax.distributed`` on 127.0.0.1, gloo),
  each with ``devices_per_process`` fake CPU devices; returns the ``subprocess.Popen``s."""
  import subprocess

  import portpicker
  port = portpicker.pick_unused_port()
  env = without_device_count(subprocess_env())  # each process sets its own (--num_cpu_devices)
  return [subprocess.Popen(
      [sys.executable, TRAIN_PY, *flags, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={processes}", f"--process_id={i}", f"--num_cpu_devices={devices_per_process}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd) for i in range(processes)]


def start_and_wait_for_records(cmd: list[str], workdir, lines: int, *, timeout: float = 300, **popen):
  """Starts ``cmd`` and returns the process once ``<workdir>/metrics.jsonl`` has ``lines`` records."""
  import subprocess
  import time
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and open(metrics).read().count("\n") >= lines:
      break
    time.sleep(0.2)
  return proc


def split_record_hash(builder, split: str) -> str:
  """sha256 over the records of a prepared TFDS split, in the order the prepared files hold them."""
  import hashlib
  source = builder.as_data_source(split)
  h = hashlib.sha256()
  for i in range(len(source)):
    r = source[i]
    h.update(repr(sorted((k, bytes(v) if isinstance(v, bytes) else int(v)) for k, v in r.items())).encode())
  return h.hexdigest()


def train_on_mesh(cfg, sizes, batches, abstract_shape=(8, 32)):
  """``(losses, state)`` after one train step per batch: on one device without a mesh (the plain
  read) when ``sizes`` is None, else on ``sharding.make_mesh(sizes)`` with the compiled sharded step."""
  import jax

  from memjax import sharding
  from memjax.train.step import jit_steps, make_step_fns
  fns = make_step_fns(cfg.model, cfg.train)
  if sizes is None:
    state, step, put = jax.jit(fns.init)(0), jax.jit(fns.train_step), lambda b: b
  else:
    steps = jit_steps(fns, sharding.make_mesh(sizes), cfg.model.memory.value_sharding)
    with jax.set_mesh(steps.mesh):
      state = steps.init(0)
      step = steps.train.trace(*steps.abstract_args(*abstract_shape)).lower().compile()
    put = lambda b: {k: jax.device_put(v, steps.batch_sharding) for k, v in b.items()}
  losses = []
  for b in batches:
    state, metrics = step(state, put(b))
    losses.append(float(metrics["loss"]))
  return losses, state
