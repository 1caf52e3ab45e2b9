"""Shared by ``knowledge.py`` and ``scaling.py``: launch ``train.py`` runs, read back what they logged.

A run is a name plus ``--config.<field>=<value>`` overrides of ``configs/base.py``. Runs execute as
``train.py`` subprocesses (the public entry point, nothing private), ``jobs`` at a time; with
``jobs > 1`` each one is pinned to its own CPU core so that parallel runs do not slow each other
unevenly and their tokens/s is a one-core figure. A finished workdir is not re-run (delete it to
redo a run), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from configs import base
from memjax.config_bridge import config_from_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict[str, Any]
  group: str = ""  # what the run is in the figure (e.g. "dense 2x"); name is unique per seed


def raw_config(overrides: dict[str, Any]):
  """``configs/base.py`` with dotted ``overrides`` applied (the same thing train.py's flags do)."""
  c = base.get_config()
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


def typed_config(overrides: dict[str, Any], vocab_size: int):
  return config_from_dict(raw_config(overrides)).with_vocab(vocab_size)


def model_figures(overrides: dict[str, Any], vocab_size: int) -> dict:
  """Total / active parameters, the memory value tables' and the PEER expert tables' parameters, and
  forward FLOPs per token from the config's formulas."""
  cfg = typed_config(overrides, vocab_size)
  counts = cfg.model.param_counts()
  return {"params_total": counts["total"], "params_active": counts["active"],
          "params_values": counts["values"], "params_experts": counts["experts"],
          "flops_per_token": cfg.model.flops_per_token(cfg.train.seq_len)}


def prepare_data(overrides: dict[str, Any]) -> int:
  """Builds the dataset and tokenizer once, before parallel runs would race to; returns the vocabulary."""
  from memjax.data import make_pipeline
  cfg = config_from_dict(raw_config(overrides))
  pipe = make_pipeline(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                       qa_jsonl=cfg.eval.qa_jsonl)
  return pipe.tokenizer.vocab_size


def _flag(key: str, value: Any) -> str:
  return f"--config.{key}={value}"


def command(run: Run, workdir: str) -> list[str]:
  return ([sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "base.py"),
           f"--workdir={workdir}"] + [_flag(k, v) for k, v in run.overrides.items()])


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "result.json"))


def read_log(workdir: str) -> dict:
  """The final evaluation, the tail of the training loss, median tokens/s, and every eval record."""
  train, evals = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      (evals if any(k in rec for k in ("val_loss", "qa_exact_match")) else train).append(rec)
  rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
  rates = rates[1:] if len(rates) > 2 else rates  # the first interval includes compilation
  losses = [r["loss"] for r in train if "loss" in r]
  return {"final": evals[-1] if evals else {}, "evals": evals,
          "train_loss_last": float(np.mean(losses[-5:])) if losses else None,
          "tokens_per_s": float(np.median(rates)) if rates else None,
          "rates": [(int(r["step"]), float(r["tokens_per_s"])) for r in train if "tokens_per_s" in r and "step" in r]}


def training_seconds(rates: list[tuple[int, float]], tokens_per_step: int) -> list[tuple[int, float]]:
  """``[(step, seconds of training up to that step)]`` from the logged ``(step, tokens_per_s)`` of each
  interval: the sum of each interval's tokens over its rate. An interval slower than half the median
  rate had something else in it (the first one the compilation, the one after an evaluation the
  evaluation's tail) and is priced at the median rate, so the figure is steady-state step time
  without compiles or evaluations.

  Example:
    >>> training_seconds([(10, 1.0), (20, 100.0), (30, 50.0), (40, 20.0)], tokens_per_step=10)
    [(10, 2.0), (20, 3.0), (30, 5.0), (40, 7.0)]
  """
  if not rates:
    return []
  steady = float(np.median([r for _, r in rates[1:]])) if len(rates) > 1 else rates[0][1]
  out, total, prev = [], 0.0, 0
  for i, (step, rate) in enumerate(rates):
    clean = steady if i == 0 or rate < 0.5 * steady else rate
    total += (step - prev) * tokens_per_step / clean
    out.append((step, total))
    prev = step
  return out


def value_at(xs: list[float], ys: list[float], x: float) -> float | None:
  """``ys`` linearly interpolated at ``x`` (``xs`` increasing, starting from the point ``(0, ys0)``
  given as the first pair); None beyond the last point.

  Example:
    >>> value_at([0.0, 10.0, 20.0], [0.0, 0.5, 0.7], 15.0)
    0.6
  """
  if not xs or x > xs[-1] + 1e-9:
    return None
  return float(np.interp(x, xs, ys))


def run_all(runs: list[Run], root: str, *, jobs: int = 2, log=print) -> dict[str, dict]:
  """Runs every ``Run`` (skipping finished ones) ``jobs`` at a time; returns {name: read_log + wall}."""
  os.makedirs(root, exist_ok=True)
  cores = sorted(os.sched_getaffinity(0))
  pending = [r for r in runs if not _finished(os.path.join(root, r.name))]
  active: dict[int, tuple] = {}  # slot -> (run, process, start time, log file)
  failed = []
  while pending or active:
    for slot in range(jobs):
      if slot in active or not pending:
        continue
      run = pending.pop(0)
      workdir = os.path.join(root, run.name)
      os.makedirs(workdir, exist_ok=True)
      out = open(os.path.join(workdir, "train.log"), "w")
      # taskset, not a preexec_fn: running Python between fork and exec in a process that has
      # imported JAX (multithreaded) can deadlock.
      pin = ["taskset", "-c", str(cores[slot % len(cores)])] if jobs > 1 and shutil.which("taskset") else []
      proc = subprocess.Popen(pin + command(run, workdir), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
      active[slot] = (run, proc, time.time(), out)
      log(f"  start {run.name}" + (f" on core {cores[slot % len(cores)]}" if pin else ""))
    time.sleep(1.0)
    for slot, (run, proc, t0, out) in list(active.items()):
      if proc.poll() is None:
        continue
      out.close()
      del active[slot]
      workdir = os.path.join(root, run.name)
      wall = time.time() - t0
      if proc.returncode != 0:
        failed.append(run.name)
        log(f"  FAILED {run.name} (exit {proc.returncode}); see {workdir}/train.log")
        continue
      result = {"wall_s": wall, "command": " ".join(command(run, workdir)), "load_avg_end": os.getloadavg()}
      with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)
      log(f"  done  {run.name} in {wall:.0f} s")
  if failed:
    raise SystemExit(f"runs failed: {', '.join(failed)}")
  results = {}
  for run in runs:
    workdir = os.path.join(root, run.name)
    with open(os.path.join(workdir, "result.json")) as f:
      results[run.name] = {**json.load(f), **read_log(workdir)}
  return results


def machine() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    model = ""
  return f"{platform.machine()} {os.cpu_count()} cpus ({model}), {platform.platform()}, python {platform.python_version()}"


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  print(f"wrote {path}")


def save_figure(fig, path: str, dpi: int) -> None:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  print(f"wrote {path}")


def compile_in_aot_venvs(script: str, targets: list[str], flags: list[str]) -> list[dict]:
  """Rows of a deviceless-compile benchmark: ``script --here --targets=... *flags`` runs once per
  platform in the accelerator compiler venv of ``.ci/aot_env.sh`` and prints its rows as JSON on its
  last line. Targets whose venv is missing are skipped with a line saying so."""
  from memjax.scale.compile import _aot_python
  from memjax.scale.targets import get

  rows = []
  for plat in ("tpu", "cuda"):
    mine = [t for t in targets if get(t).platform == plat]
    if not mine:
      continue
    python = _aot_python(plat)
    if python is None:
      print(f"no {plat} compiler venv (bash .ci/aot_env.sh {plat}): skipping {mine}")
      continue
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([python, os.path.abspath(script), "--here", f"--targets={','.join(mine)}", *flags],
                         stdout=subprocess.PIPE, text=True, env=env, check=True)
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  return rows
