"""Kill soak: SIGKILL `train.py` at random moments, re-run the same command, and check the outcome.

  python benchmarks/kill_soak.py                       # 20 kills, configs/tiny.py, 16 steps
  python benchmarks/kill_soak.py --kills=5 --seed=1

1. An uninterrupted reference run (same command, same seed) gives the expected losses and parameters.
2. Trials: a fresh workdir is run again and again with the same command; each attempt is killed with
   SIGKILL at a random moment until an attempt finishes: one kill in four after a delay drawn uniformly
   up to a clean run's duration, one in four the moment an Orbax temporary directory appears in
   ``checkpoints/`` (mid-checkpoint-write), half mid-training (after a random number of newly logged
   steps plus a random fraction of a step).
   Trials repeat until ``--kills`` kills happened.
3. Every finished trial is compared with the reference: the loss of every logged step (bit-for-bit),
   no duplicate or torn lines in ``metrics.jsonl``, and every array of the final checkpoint.

Prints a survival table by the phase the kill hit and writes ``benchmarks/results/kill_soak.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from memjax.command import ArgumentParser, run_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir: str, data_dir: str, steps: int, checkpoint_every: int) -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
          f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", f"--config.train.steps={steps}",
          f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.log_every=1"]


def _tmp_dirs(path: str) -> list[str]:
  return [n for n in os.listdir(path) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(path) else []


def _phase(workdir: str, lines_before: int) -> str:
  if _tmp_dirs(os.path.join(workdir, "checkpoints")):
    return "checkpoint write"
  if _tmp_dirs(os.path.join(workdir, "export")):
    return "export write"
  metrics = os.path.join(workdir, "metrics.jsonl")
  lines = _count_lines(metrics)
  return "training" if lines > lines_before else "start-up (data, restore, compile)"


def _count_lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _losses(workdir: str) -> tuple[dict, list[str]]:
  problems, losses = [], {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for n, line in enumerate(f, 1):
      try:
        r = json.loads(line)
      except ValueError:
        problems.append(f"torn line {n}")
        continue
      if "loss" in r:
        if int(r["step"]) in losses:
          problems.append(f"duplicate step {int(r['step'])}")
        losses[int(r["step"])] = r["loss"]
  return losses, problems


def _final_leaves(workdir: str):
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(ckpt_dir, str(step), "state"))
  return step, [np.asarray(x) for x in jax.tree.leaves(tree)]


def _attempt(cmd, workdir, rng, kill: bool, max_delay: float, steps: int = 0):
  """One run of the command; kills it at a random moment if ``kill``. Returns (returncode, phase or None)."""
  lines_before = _count_lines(os.path.join(workdir, "metrics.jsonl"))
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  phase = None
  if kill:
    # One kill in four at any moment, one in four mid-checkpoint-write, half mid-training: after a
    # random number of newly logged steps plus a random fraction of a step.
    mode = rng.choice(["anytime", "checkpoint", "training", "training"])
    metrics, ckpt_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "checkpoints")
    deadline = time.time() + (rng.uniform(0.5, max_delay) if mode == "anytime" else 600)
    new_lines = rng.randint(1, max(1, steps - lines_before))
    while proc.poll() is None and time.time() < deadline:
      if mode == "checkpoint" and _tmp_dirs(ckpt_dir):
        break
      if mode == "training" and _count_lines(metrics) >= lines_before + new_lines:
        time.sleep(rng.uniform(0.0, 0.3))
        break
      time.sleep(0.002 if mode == "checkpoint" else 0.02)
    if proc.poll() is None:
      phase = _phase(workdir, lines_before)
      proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=600)
  return proc.returncode, phase, err


def main() -> None:
  parser = ArgumentParser(prog="benchmarks/kill_soak.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "kill_soak.json"))
  args = parser.parse_args()
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "memjax-test-jax-cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="memjax-kill-soak-")
  data_dir = os.path.join(root, "data")
  t0 = time.time()
  ref = os.path.join(root, "reference")
  rc, _, err = _attempt(_command(ref, data_dir, args.steps, args.checkpoint_every), ref, rng, False, 0)
  assert rc == 0, err[-2000:]
  ref_losses, _ = _losses(ref)
  ref_step, ref_leaves = _final_leaves(ref)
  # A second clean run, with data prepared and programs cached, times an attempt: kill delays are
  # drawn up to this long, so most attempts die and some die late.
  t1 = time.time()
  warm = os.path.join(root, "warm")
  rc, _, err = _attempt(_command(warm, data_dir, args.steps, args.checkpoint_every), warm, rng, False, 0)
  assert rc == 0, err[-2000:]
  t_ref = time.time() - t1
  assert _losses(warm)[0] == ref_losses, "two clean runs differ: the soak needs a deterministic run"

  kills, trials = [], []
  while len(kills) < args.kills:
    workdir = os.path.join(root, f"trial{len(trials)}")
    cmd = _command(workdir, data_dir, args.steps, args.checkpoint_every)
    trial_kills, attempts = [], 0
    while True:
      attempts += 1
      rc, phase, err = _attempt(cmd, workdir, rng, len(kills) < args.kills, t_ref, args.steps)
      if phase is not None:
        record = {"trial": len(trials), "attempt": attempts, "phase": phase, "returncode": rc}
        kills.append(record)
        trial_kills.append(record)
        continue
      if rc != 0:
        raise SystemExit(f"trial {len(trials)} attempt {attempts} failed with {rc}:\n{err[-3000:]}")
      break
    losses, problems = _losses(workdir)
    step, leaves = _final_leaves(workdir)
    same_losses = losses == ref_losses
    same_params = step == ref_step and len(leaves) == len(ref_leaves) and all(
        a.dtype == b.dtype and a.shape == b.shape and (a == b).all() for a, b in zip(leaves, ref_leaves))
    ok = same_losses and same_params and not problems
    for record in trial_kills:
      record["trial_identical"] = ok
    trials.append({"kills": len(trial_kills), "attempts": attempts, "final_step": step,
                   "losses_identical": same_losses, "params_identical": same_params, "log_problems": problems})
    print(f"trial {len(trials) - 1}: {len(trial_kills)} kills ({', '.join(k['phase'] for k in trial_kills)}), "
          f"final step {step}, losses identical {same_losses}, params identical {same_params}, "
          f"log problems {problems or 'none'}", flush=True)

  table = collections.OrderedDict()
  for k in kills:
    row = table.setdefault(k["phase"], {"kills": 0, "resumed_identical": 0})
    row["kills"] += 1
    row["resumed_identical"] += int(k["trial_identical"])
  print(f"\n{'phase at SIGKILL':36s} {'kills':>5s} {'survived (identical)':>21s}")
  for phase, row in table.items():
    print(f"{phase:36s} {row['kills']:5d} {row['resumed_identical']:21d}")
  total_ok = sum(r["resumed_identical"] for r in table.values())
  print(f"{'total':36s} {len(kills):5d} {total_ok:21d}   ({len(trials)} trials, {time.time() - t0:.0f} s)")
  result = {"command": " ".join(sys.argv), "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "seed": args.seed, "clean_run_seconds": round(t_ref, 1), "kills": kills, "trials": trials,
            "by_phase": table, "survived": total_ok, "total_kills": len(kills),
            "seconds": round(time.time() - t0, 1)}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  shutil.rmtree(root, ignore_errors=True)
  if total_ok != len(kills):
    sys.exit(1)


if __name__ == "__main__":
  run_command(main)
