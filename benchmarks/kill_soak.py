"""Kill soak: SIGKILL `train.py` at random moments, re-run the same command(s), and check the outcome.

  python benchmarks/kill_soak.py                       # 1 process: 20 kills, configs/tiny.py, 16 steps
  python benchmarks/kill_soak.py --kills=100
  python benchmarks/kill_soak.py --processes=2 --kills=30   # 2 processes x 4 fake CPU devices
  python benchmarks/kill_soak.py --async_checkpoint          # checkpoints written in the background

1. An uninterrupted reference run (same command(s), same seed) gives the expected losses and parameters.
2. Trials: a fresh workdir is run again and again with the same command(s); each attempt gets one
   SIGKILL at a random moment until an attempt finishes: one kill in five after a delay drawn uniformly
   up to a clean run's duration (start-up included), one in five the moment an Orbax temporary directory
   appears in ``checkpoints/`` (mid-checkpoint-write), one in five the moment one appears in ``export/``
   (mid-export), two in five mid-training (after a random number of newly logged steps plus a random
   fraction of a step). Trials repeat until ``--kills`` kills happened.
   With ``--processes=2`` the kill hits one process, chosen at random; the other must exit by itself
   with code 1 and one ``error:`` line naming the lost process within ``--lost_process_timeout`` + 15 s
   (``--startup_timeout`` is set to the same number of seconds, for kills before both connected)
   (the survivor's exit is timed and checked; a survivor whose run had already finished when its peer
   was killed may exit 0), then both are restarted with the same commands.
3. Every finished trial is compared with the reference: the loss of every logged step (bit-for-bit),
   no duplicate or torn lines in ``metrics.jsonl``, and every array of the final checkpoint.

Prints a survival table by the phase the kill hit and writes ``benchmarks/results/kill_soak.json``
(``kill_soak_2proc.json`` with ``--processes=2``).
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
PHASES = ["anytime", "checkpoint", "export", "training", "training"]


def _commands(workdir: str, data_dir: str, args, port: int) -> list[list[str]]:
  base = [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
          f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", f"--config.train.steps={args.steps}",
          f"--config.train.checkpoint_every={args.checkpoint_every}", "--config.train.log_every=1",
          f"--config.train.async_checkpoint={args.async_checkpoint}"]
  if args.processes == 1:
    return [base]
  return [base + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={args.processes}",
                  f"--process_id={i}", f"--num_cpu_devices={8 // args.processes}",
                  f"--lost_process_timeout={args.lost_process_timeout}",
                  f"--startup_timeout={max(1, round(args.lost_process_timeout))}"] for i in range(args.processes)]


def _tmp_dirs(path: str) -> list[str]:
  return [n for n in os.listdir(path) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(path) else []


def _count_lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _phase(workdir: str, lines_before: int) -> str:
  if _tmp_dirs(os.path.join(workdir, "checkpoints")):
    return "checkpoint write"
  if _tmp_dirs(os.path.join(workdir, "export")):
    return "export write"
  return "training" if _count_lines(os.path.join(workdir, "metrics.jsonl")) > lines_before else \
      "start-up (data, restore, compile)"


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
  """The newest checkpoint's arrays as numpy, whatever mesh or number of processes wrote them."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    restored = c.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return step, [np.asarray(x) for x in jax.tree.leaves(restored)]


def _attempt(cmds, workdir, rng, kill: bool, max_delay: float, args):
  """One run of the command(s); kills one process at a random moment if ``kill``.

  Returns (return codes, phase or None, victim or None, survivor seconds to exit or None, stderrs)."""
  lines_before = _count_lines(os.path.join(workdir, "metrics.jsonl"))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" or len(cmds) == 1}
  procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
  phase = victim = survivor_s = None
  if kill:
    mode = rng.choice(PHASES)
    metrics, ckpt_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "checkpoints")
    export_dir = os.path.join(workdir, "export")
    deadline = time.time() + (rng.uniform(0.5, max_delay) if mode == "anytime" else 600)
    new_lines = rng.randint(1, max(1, args.steps - lines_before))
    while all(p.poll() is None for p in procs) and time.time() < deadline:
      if mode == "checkpoint" and _tmp_dirs(ckpt_dir) or mode == "export" and _tmp_dirs(export_dir):
        break
      if mode == "training" and _count_lines(metrics) >= lines_before + new_lines:
        time.sleep(rng.uniform(0.0, 0.3))
        break
      time.sleep(0.002 if mode in ("checkpoint", "export") else 0.02)
    if all(p.poll() is None for p in procs):
      phase = _phase(workdir, lines_before)
      victim = rng.randrange(len(procs))
      procs[victim].send_signal(signal.SIGKILL)
      t_kill = time.time()
  errs = [None] * len(procs)
  for i, p in enumerate(procs):
    if victim is not None and i != victim:
      try:
        errs[i] = p.communicate(timeout=args.lost_process_timeout + 120)[1]
      except subprocess.TimeoutExpired:
        p.kill()
        errs[i] = p.communicate()[1] + "\n[soak: the survivor did not exit by itself]"
      survivor_s = max(survivor_s or 0.0, time.time() - t_kill)
  for i, p in enumerate(procs):
    if errs[i] is None:
      errs[i] = p.communicate(timeout=600)[1]
  return [p.returncode for p in procs], phase, victim, survivor_s, errs


def _survivor_ok(codes, victim, errs, survivor_s, args) -> tuple[bool, str]:
  """A survivor exits 1, by itself, in time, with one error line naming the victim and no stack dump;
  or exits 0 because its run had already finished when its peer was killed (a kill at the very end)."""
  for i, (code, err) in enumerate(zip(codes, errs)):
    if i == victim:
      continue
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("error: ")]
    if code == 0 and not lines:
      continue
    problems = [what for what, bad in (
        (f"exit {code}", code != 1), (f"{len(lines)} error lines", len(lines) != 1),
        (f"the line does not name process {victim}", bool(lines) and f"process {victim}" not in lines[0]),
        ("a stack dump", "@ 0x" in err), ("a traceback", "Traceback" in err)) if bad]
    if problems:
      tail = " | ".join(err.strip().splitlines()[-4:])
      return False, f"process {i}: {', '.join(problems)}; stderr ends: {tail[-600:]}"
  if survivor_s > args.lost_process_timeout + 15:
    return False, f"survivor took {survivor_s:.1f} s"
  return True, ""


def main() -> None:
  parser = ArgumentParser(prog="benchmarks/kill_soak.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--processes", type=int, default=1, choices=(1, 2))
  parser.add_argument("--lost_process_timeout", type=float, default=10.0)
  parser.add_argument("--async_checkpoint", action="store_true", help="checkpoints written in the background")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  out = args.out or os.path.join(REPO, "benchmarks", "results", "kill_soak" + ("" if args.processes == 1 else "_2proc")
                                 + ("_async" if args.async_checkpoint else "") + ".json")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "memjax-test-jax-cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  import portpicker
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="memjax-kill-soak-")
  data_dir = os.path.join(root, "data")
  if args.processes > 1:  # prepared once, so that no attempt dies in a first-time build
    from memjax.data import make_pipeline
    make_pipeline(seq_len=64, batch_size=8, kb="tiny", data_dir=data_dir)
  t0 = time.time()
  ref = os.path.join(root, "reference")
  codes, _, _, _, errs = _attempt(_commands(ref, data_dir, args, portpicker.pick_unused_port()), ref, rng, False, 0,
                                  args)
  assert codes == [0] * args.processes, errs[0][-2000:]
  ref_losses, _ = _losses(ref)
  ref_step, ref_leaves = _final_leaves(ref)
  # A second clean run, with data prepared and programs cached, times an attempt: "anytime" kill delays
  # are drawn up to this long, so most attempts die and some die late.
  t1 = time.time()
  warm = os.path.join(root, "warm")
  codes, _, _, _, errs = _attempt(_commands(warm, data_dir, args, portpicker.pick_unused_port()), warm, rng, False, 0,
                                  args)
  assert codes == [0] * args.processes, errs[0][-2000:]
  t_ref = time.time() - t1
  assert _losses(warm)[0] == ref_losses, "two clean runs differ: the soak needs a deterministic run"

  kills, trials = [], []
  while len(kills) < args.kills:
    workdir = os.path.join(root, f"trial{len(trials)}")
    trial_kills, attempts = [], 0
    while True:
      attempts += 1
      cmds = _commands(workdir, data_dir, args, portpicker.pick_unused_port())
      codes, phase, victim, survivor_s, errs = _attempt(cmds, workdir, rng, len(kills) < args.kills, t_ref, args)
      if phase is not None:
        record = {"trial": len(trials), "attempt": attempts, "phase": phase, "returncodes": codes}
        if args.processes > 1:
          ok, why = _survivor_ok(codes, victim, errs, survivor_s, args)
          record.update(victim=victim, survivor_seconds=round(survivor_s, 1), survivor_ok=ok, survivor_problem=why)
        kills.append(record)
        trial_kills.append(record)
        continue
      if any(codes):
        raise SystemExit(f"trial {len(trials)} attempt {attempts} failed with {codes}:\n"
                         + "\n".join(e[-3000:] for e in errs))
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
    row = table.setdefault(k["phase"], {"kills": 0, "resumed_identical": 0, "survivor_ok": 0,
                                        "survivor_max_seconds": 0.0})
    row["kills"] += 1
    row["resumed_identical"] += int(k["trial_identical"])
    if args.processes > 1:
      row["survivor_ok"] += int(k["survivor_ok"])
      row["survivor_max_seconds"] = max(row["survivor_max_seconds"], k["survivor_seconds"])
  multi = args.processes > 1
  print(f"\n{'phase at SIGKILL':36s} {'kills':>5s} {'resumed identical':>18s}"
        + (f" {'survivor ok':>12s} {'survivor max s':>15s}" if multi else ""))
  for phase, row in table.items():
    print(f"{phase:36s} {row['kills']:5d} {row['resumed_identical']:18d}"
          + (f" {row['survivor_ok']:12d} {row['survivor_max_seconds']:15.1f}" if multi else ""))
  total_ok = sum(r["resumed_identical"] for r in table.values())
  survivors_ok = sum(r["survivor_ok"] for r in table.values())
  print(f"{'total':36s} {len(kills):5d} {total_ok:18d}" + (f" {survivors_ok:12d}" if multi else "")
        + f"   ({len(trials)} trials, {time.time() - t0:.0f} s)")
  result = {"command": "python benchmarks/kill_soak.py " + " ".join(sys.argv[1:]), "processes": args.processes,
            "async_checkpoint": args.async_checkpoint,
            "steps": args.steps, "checkpoint_every": args.checkpoint_every, "seed": args.seed,
            "lost_process_timeout": args.lost_process_timeout if multi else None,
            "clean_run_seconds": round(t_ref, 1), "kills": kills, "trials": trials, "by_phase": table,
            "survived": total_ok, "survivors_ok": survivors_ok if multi else None, "total_kills": len(kills),
            "seconds": round(time.time() - t0, 1)}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  shutil.rmtree(root, ignore_errors=True)
  if total_ok != len(kills) or (multi and survivors_ok != len(kills)):
    sys.exit(1)


if __name__ == "__main__":
  run_command(main)
