"""CPU benchmark of the product-key top-k: the C++ kernel (backend "cpu") against the XLA path.

Run by hand (never from tests):

  .venv/bin/python benchmarks/topk.py              # three shapes, 9 rounds
  .venv/bin/python benchmarks/topk.py --quick      # the smallest shape only, 7 rounds

Operations, each jitted for both selection backends of ``memjax.kernels.topk``:
  select     ``product_topk_from_scores(s1, s2, k)`` on precomputed sub-key scores: the selection alone
  fwd        ``product_key_topk(query, keys, k)``: sub-key scores, selection, score recomputation
  fwd+bwd    value and gradient (query and keys) of a small loss, sum(w * softmax(scores))
Shapes are (tokens, heads, n, k) with key_dim 64 (the knowledge sweep's layer is the first). The
contenders run in alternation within one process (round r runs each of them once, in a rotating
order), so load from other processes on a shared machine hits both alike; medians (and minima) over
rounds are reported, with the XLA/kernel ratio. Results go to benchmarks/results/topk.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from memjax import product_key_topk
from memjax.command import ArgumentParser, run_command
from memjax.kernels import cpu as cpu_backend
from memjax.kernels.topk import product_topk_from_scores

FULL = [(2048, 2, 256, 32), (2048, 4, 1024, 32), (16384, 4, 1024, 32)]  # (tokens, heads, n, k)
QUICK = FULL[:1]
KEY_DIM = 64
BACKENDS = ("cpu", "xla")
OPS = ("select", "fwd", "fwd+bwd")


def _fns(backend, k):
  select = jax.jit(lambda s1, s2: product_topk_from_scores(s1, s2, k, backend=backend))
  fwd = jax.jit(lambda q, kk: product_key_topk(q, kk, k, backend=backend))

  def loss(q, kk, w):
    scores, _ = product_key_topk(q, kk, k, backend=backend)
    return jnp.sum(w * jax.nn.softmax(scores, axis=-1))

  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return {"select": select, "fwd": fwd, "fwd+bwd": fwd_bwd}


def bench_config(tokens, heads, n, k, rounds):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((tokens, heads, KEY_DIM)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((heads, 2, n, KEY_DIM // 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((tokens, heads, k)), jnp.float32)
  s1, s2 = (jnp.asarray(rng.standard_normal((tokens, heads, n)), jnp.float32) for _ in range(2))
  args = {"select": (s1, s2), "fwd": (q, keys), "fwd+bwd": (q, keys, w)}
  runs, outputs = {}, {}
  for backend in BACKENDS:
    fns = _fns(backend, k)
    for op in OPS:
      runs[(backend, op)] = lambda f=fns[op], a=args[op]: jax.block_until_ready(f(*a))
      outputs[(backend, op)] = runs[(backend, op)]()  # compile and warm up
  # The two backends must agree before their times mean anything.
  same = {op: all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(outputs[("cpu", op)]), jax.tree.leaves(outputs[("xla", op)])))
          for op in OPS}
  times = {key: [] for key in runs}
  keys_ = list(runs)
  for r in range(rounds):
    for key in keys_[r % len(keys_):] + keys_[: r % len(keys_)]:
      t = time.perf_counter()
      runs[key]()
      times[key].append(time.perf_counter() - t)
  result = {"tokens": tokens, "heads": heads, "n": n, "k": k, "key_dim": KEY_DIM, "rows": tokens * heads,
            "outputs_identical": same, "ops": {}}
  for op in OPS:
    entry = {}
    for backend in BACKENDS:
      ts = times[(backend, op)]
      entry[backend] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                        "times_ms": [t * 1e3 for t in ts]}
    entry["xla_over_cpu"] = entry["xla"]["median_ms"] / entry["cpu"]["median_ms"]
    result["ops"][op] = entry
  return result


def print_table(results):
  print(f"\n{'tokens x heads, n, k':<24}{'op':<9}{'kernel ms':>10}{'(min)':>8}{'XLA ms':>9}{'(min)':>8}"
        f"{'XLA/kernel':>11}{'us/row':>8}  identical")
  for res in results:
    shape = f"{res['tokens']} x {res['heads']}, {res['n']}, {res['k']}"
    for op, e in res["ops"].items():
      per_row = 1e3 * e["cpu"]["median_ms"] / res["rows"]
      print(f"{shape:<24}{op:<9}{e['cpu']['median_ms']:>10.2f}{e['cpu']['min_ms']:>8.2f}"
            f"{e['xla']['median_ms']:>9.2f}{e['xla']['min_ms']:>8.2f}{e['xla_over_cpu']:>10.1f}x"
            f"{per_row:>8.2f}  {res['outputs_identical'][op]}")
      shape = ""


def main(argv=None):
  parser = ArgumentParser(prog="benchmarks/topk.py", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the smallest shape only")
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 9, quick 7)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "topk.json"))
  args = parser.parse_args(argv)
  rounds = args.rounds or (7 if args.quick else 9)
  ok, message = cpu_backend.ffi_status()
  if not ok:
    print(f"the C++ kernels are unavailable ({message}): nothing to compare")
    return 1
  results = []
  for tokens, heads, n, k in (QUICK if args.quick else FULL):
    print(f"{tokens} tokens x {heads} heads, n={n}, k={k} ...", flush=True)
    results.append(bench_config(tokens, heads, n, k, rounds))
  print_table(results)
  payload = {
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                  "load_average_at_end": os.getloadavg(), "jax": jax.__version__, "kernel": message},
      "rounds": rounds, "results": results}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  run_command(main)
