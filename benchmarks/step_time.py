"""Train-step time against memory size, for row-sparse and dense value updates.

  python benchmarks/step_time.py                      # n_keys 64, 256, 1024 (4k -> 1M slots)
  python benchmarks/step_time.py --n_keys=64,256 --repeats=5

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
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.json"))
  args = p.parse_args(argv)
  n_keys = [int(x) for x in args.n_keys.split(",")]
  results = []
  for update in args.updates.split(","):
    runners = {}
    for n in n_keys:
      c = default.get_config()
      c.model.memory.n_keys = n
      c.model.memory.value_update = update
      cfg = config_from_dict(c).with_vocab(259)
      fns = make_step_fns(cfg.model, cfg.train)
      state = jax.jit(fns.init)(0)
      step = jax.jit(fns.train_step, donate_argnums=0)
      batch = _batch(cfg.train.batch_size, cfg.train.seq_len, 259)
      state, m = step(state, batch)  # compile
      jax.block_until_ready(m)
      runners[n] = [step, state, batch, []]
      print(f"compiled {update} n_keys={n} ({n * n:,} slots)", flush=True)
    for _ in range(args.repeats):
      for n in n_keys:
        r = runners[n]
        t0 = time.perf_counter()
        r[1], m = r[0](r[1], r[2])
        jax.block_until_ready(m)
        r[3].append(time.perf_counter() - t0)
    base = np.median(runners[n_keys[0]][3])
    for n in n_keys:
      med = float(np.median(runners[n][3]))
      results.append({"value_update": update, "n_keys": n, "slots": n * n, "median_s": med,
                      "ratio_to_smallest": med / base, "times_s": runners[n][3]})
    del runners
  print(f"\n{'update':>7} {'n_keys':>7} {'slots':>10} {'median ms':>10} {'x smallest':>10}")
  for r in results:
    print(f"{r['value_update']:>7} {r['n_keys']:>7} {r['slots']:>10,} {r['median_s'] * 1e3:>10.1f} "
          f"{r['ratio_to_smallest']:>10.2f}")
  meta = {"command": "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]),
          "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
          "jax": jax.__version__, "repeats": args.repeats}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_command(main)
