"""The product-key top-k's formulations, compiled for TPU and GPU from this machine (deviceless AOT).

  python benchmarks/topk_compile.py                     # v5p and h100, the issue's shape
  python benchmarks/topk_compile.py --targets=v5p-8 --tokens=4096

One chip of each target compiles, for [tokens, heads, key_dim] bf16 queries against [heads, 2, n,
key_dim/2] sub-keys (default: 16k tokens x 4 heads, n 1024, k 32, key width 256), each stage of the
selection as its own function, so that the compiler's cost model (TPU ``optimal_seconds``; flops and
bytes on both) prices each part:
  scoring         the two halves' sub-key scores (two batched matmuls)
  halves top-k    + ``jax.lax.top_k`` of each half
  xla             the whole ``product_key_topk(backend="xla")`` (halves, k x k grid, index gathers,
                  the chosen sub-keys' gathered, recomputed scores): the formulation before
  auto            ``backend="auto"`` (``model.memory.topk`` default): on TPU the gather-free one
                  (one-hot picks for the grid's indices and the chosen scores)
  approx          ``backend="approx"``: ``jax.lax.approx_max_k`` per half, then as ``auto``
  ... fwd+bwd     the same and its gradient in query and keys (the training cost)
The estimate is a cost model, not a measurement: the table puts flops and bytes beside it. Runs
itself in the venvs of ``.ci/aot_env.sh`` (one per platform). Writes
``benchmarks/results/topk_compile.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs  # noqa: E402

from memjax.command import ArgumentParser, run_command  # noqa: E402



def _functions(k: int):
  import jax
  import jax.numpy as jnp

  from memjax.memory.product_keys import product_key_topk, subkey_scores

  def halves(q, keys):
    s1, s2 = subkey_scores(q, keys)
    return jax.lax.top_k(s1, k), jax.lax.top_k(s2, k)

  def grad_of(backend):
    def loss(q, keys):
      scores, idx = product_key_topk(q, keys, k, backend=backend)
      return jnp.sum(scores.astype(jnp.float32) * jnp.cos(idx.astype(jnp.float32)))
    return jax.grad(loss, argnums=(0, 1))

  return {
      "scoring": subkey_scores,
      "halves top-k": halves,
      **{b: (lambda q, keys, b=b: product_key_topk(q, keys, k, backend=b)) for b in ("xla", "auto", "approx")},
      **{f"{b} fwd+bwd": grad_of(b) for b in ("xla", "auto", "approx")},
  }


def compile_here(targets, tokens, heads, n, k, key_dim):
  """In a compiler venv: compile every variant for one chip of each target; list of rows."""
  import jax
  import jax.numpy as jnp

  from memjax.scale.compile import _gpu_compiler_options
  from memjax.scale.targets import devices, get

  rows = []
  for name in targets:
    target = get(name)
    dev = devices(target)[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    q = jax.ShapeDtypeStruct((tokens, heads, key_dim), jnp.bfloat16, sharding=sh)
    keys = jax.ShapeDtypeStruct((heads, 2, n, key_dim // 2), jnp.bfloat16, sharding=sh)
    for variant, f in _functions(k).items():
      t0 = time.time()
      compiled = jax.jit(f).trace(q, keys).lower().compile(_gpu_compiler_options(target) or None)
      cost = compiled.cost_analysis()
      cost = dict(cost[0] if isinstance(cost, (list, tuple)) else cost or {})
      m = compiled.memory_analysis()
      rows.append({"target": name, "variant": variant, "compile_s": round(time.time() - t0, 1),
                   "optimal_seconds": cost.get("optimal_seconds"), "flops": cost.get("flops"),
                   "bytes_accessed": cost.get("bytes accessed"), "temp_bytes": m.temp_size_in_bytes})
      print(f"  {name} {variant}: {rows[-1]}", file=sys.stderr, flush=True)
  return rows


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/topk_compile.py", description=__doc__.splitlines()[0])
  p.add_argument("--targets", default="v5p-8,h100-1", help="comma-separated names of memjax.scale.targets")
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--key_dim", type=int, default=256)
  p.add_argument("--here", action="store_true", help=argparse_suppress())
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "topk_compile.json"))
  args = p.parse_args(argv)
  from memjax.scale.targets import get
  targets = [t for t in args.targets.split(",") if t]
  for t in targets:
    try:
      get(t)
    except ValueError as e:
      p.error(f"--targets: {e}")
  shape = (args.tokens, args.heads, args.n, args.k, args.key_dim)
  if args.here:
    print(json.dumps(compile_here(targets, *shape)))
    return 0
  rows = _runs.compile_in_aot_venvs(__file__, targets, [f"--tokens={args.tokens}", f"--heads={args.heads}", f"--n={args.n}", f"--k={args.k}",
                                        f"--key_dim={args.key_dim}"])
  print(f"\n{args.tokens} tokens x {args.heads} heads, n={args.n}, k={args.k}, key width {args.key_dim}, bf16")
  print(f"{'target':<8} {'variant':<16} {'est. ms':>8} {'GFLOP':>8} {'MB moved':>9} {'temp MB':>8}")
  for r in rows:
    est = f"{r['optimal_seconds'] * 1e3:.2f}" if r["optimal_seconds"] else "-"
    print(f"{r['target']:<8} {r['variant']:<16} {est:>8} {(r['flops'] or 0) / 1e9:>8.2f} "
          f"{(r['bytes_accessed'] or 0) / 1e6:>9.1f} {r['temp_bytes'] / 1e6:>8.1f}")
  with open(args.out, "w") as f:
    json.dump({"command": "python benchmarks/topk_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "shape": dict(zip(("tokens", "heads", "n", "k", "key_dim"), shape)), "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")
  return 0


def argparse_suppress():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  run_command(main)
