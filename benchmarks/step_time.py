"""Train-step time against memory size, for row-sparse and dense value updates.

  python benchmarks/step_time.py                      # n_keys 64, 256, 1024 (4k -> 1M slots)
  python benchmarks/step_time.py --n_keys=64,256 --repeats=5
  python benchmarks/step_time.py --n_keys=256 --updates=sparse --update_barrier=on,off \
      --out=benchmarks/results/step_time_barrier.json   # A/B of train.update_barrier

Everything but ``model.memory.n_keys`` is fixed (configs/default.py's Memory+ model, batch 16 x 128).
Steps of the different sizes are interleaved (A, B, C, A, B, C, ...) so that a noisy shared machine
slows them alike; the table reports medians and the ratio to the smallest memory. Writes
``benchmarks/results/step_time.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np

from configs import default
from memjax.command import ArgumentParser, run_command
from memjax.config_bridge import config_from_dict
from memjax.train.step import make_step_fns


def _batch(b, t, vocab, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/step_time.py", description=__doc__.splitlines()[0])
  p.add_argument("--n_keys", default="64,256,1024")
  p.add_argument("--updates", default="sparse,dense")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--update_barrier", default="on", help="train.update_barrier settings to interleave: on, off or on,off")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.json"))
  args = p.parse_args(argv)
  n_keys = [int(x) for x in args.n_keys.split(",")]
  barriers = args.update_barrier.split(",")
  if not barriers or set(barriers) - {"on", "off"}:
    p.error(f"--update_barrier={args.update_barrier!r}: allowed on, off, on,off")
  runs = [(n, b) for n in n_keys for b in barriers]
  results = []
  for update in args.updates.split(","):
    runners = {}
    for n, barrier in runs:
      c = default.get_config()
      c.model.memory.n_keys = n
      c.model.memory.value_update = update
      c.train.update_barrier = barrier == "on"
      cfg = config_from_dict(c).with_vocab(259)
      fns = make_step_fns(cfg.model, cfg.train)
      state = jax.jit(fns.init)(0)
      step = jax.jit(fns.train_step, donate_argnums=0)
      batch = _batch(cfg.train.batch_size, cfg.train.seq_len, 259)
      state, m = step(state, batch)  # compile
      jax.block_until_ready(m)
      runners[n, barrier] = [step, state, batch, []]
      print(f"compiled {update} n_keys={n} ({n * n:,} slots) update_barrier={barrier}", flush=True)
    for _ in range(args.repeats):
      for run in runs:
        r = runners[run]
        t0 = time.perf_counter()
        r[1], m = r[0](r[1], r[2])
        jax.block_until_ready(m)
        r[3].append(time.perf_counter() - t0)
    for n, barrier in runs:
      med = float(np.median(runners[n, barrier][3]))
      base = np.median(runners[n_keys[0], barrier][3])
      results.append({"value_update": update, "n_keys": n, "slots": n * n, "update_barrier": barrier,
                      "median_s": med, "ratio_to_smallest": med / base,
                      "ratio_to_first_barrier": med / np.median(runners[n, barriers[0]][3]),
                      "times_s": runners[n, barrier][3]})
    del runners
  print(f"\n{'update':>7} {'n_keys':>7} {'slots':>10} {'barrier':>8} {'median ms':>10} {'x smallest':>10} "
        f"{'x ' + barriers[0]:>8}")
  for r in results:
    print(f"{r['value_update']:>7} {r['n_keys']:>7} {r['slots']:>10,} {r['update_barrier']:>8} "
          f"{r['median_s'] * 1e3:>10.1f} {r['ratio_to_smallest']:>10.2f} {r['ratio_to_first_barrier']:>8.2f}")
  meta = {"command": "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]),
          "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
          "jax": jax.__version__, "repeats": args.repeats}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_command(main)
