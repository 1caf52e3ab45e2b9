"""``model.attention`` einsum vs auto (the fused kernel), compiled for TPU and GPU from this machine.

  python benchmarks/attention_compile.py                         # v5p-8 and h100-4, default config
  python benchmarks/attention_compile.py --targets=v5p-8 --seq_len=2048 --batch_size=8

The default config's train step (bf16 compute, ``--seq_len`` x ``--batch_size`` tokens, the batch
over ``data`` = every chip of the target) compiles once per implementation with the target's own
compiler (deviceless AOT, in the venvs of ``.ci/aot_env.sh``). Per row: temporaries per device, the
compiler's time estimate (TPU only: a cost model, not a measurement), and the fused kernels found in
the compiled HLO (TPU: Pallas ``tpu_custom_call``s; GPU: cuDNN ``fmha`` calls). Writes
``benchmarks/results/attention_compile.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs  # noqa: E402

from memjax.command import ArgumentParser, run_command  # noqa: E402

IMPLS = ("einsum", "auto")


def compile_here(targets: list[str], seq_len: int, batch_size: int) -> list[dict]:
  import collections

  import jax

  from memjax import sharding
  from memjax.scale.compile import _gpu_compiler_options
  from memjax.scale.plan import load_config
  from memjax.scale.targets import devices, get
  from memjax.train.step import jit_steps, make_step_fns

  rows = []
  for name in targets:
    target = get(name)
    for impl in IMPLS:
      cfg = load_config(os.path.join(REPO, "configs", "default.py"),
                        [("model.attention", impl), ("model.dtype", "bfloat16"), ("train.seq_len", str(seq_len)),
                         ("train.batch_size", str(batch_size))])
      mesh = sharding.make_mesh(dict(data=target.chips, fsdp=1, memory=1), devices(target))
      steps = jit_steps(make_step_fns(cfg.model, cfg.train), mesh, cfg.model.memory.value_sharding)
      state, batch = steps.abstract_args(batch_size, seq_len)
      with jax.set_mesh(mesh):
        compiled = steps.train.trace(state, batch).lower().compile(_gpu_compiler_options(target) or None)
      hlo = compiled.as_text()
      calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
      fused = {t: n for t, n in calls.items() if t == "tpu_custom_call" or "fmha" in t}
      rows.append({"target": name, "attention": impl, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                   "optimal_seconds": dict(cost).get("optimal_seconds"), "fused_calls": fused})
  return rows


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/attention_compile.py", description=__doc__.splitlines()[0])
  p.add_argument("--targets", default="v5p-8,h100-4", help="comma-separated names of memjax.scale.targets")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--here", action="store_true", help=_suppress())
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "attention_compile.json"))
  args = p.parse_args(argv)
  from memjax.scale.targets import get
  targets = [t for t in args.targets.split(",") if t]
  for t in targets:
    try:
      get(t)
    except ValueError as e:
      p.error(f"--targets: {e}")
    if args.batch_size % get(t).chips:
      p.error(f"--batch_size={args.batch_size} must be divisible by {t}'s {get(t).chips} chips")
  if args.seq_len < 1 or args.batch_size < 1:
    p.error(f"--seq_len and --batch_size must be >= 1, got {args.seq_len}, {args.batch_size}")
  if args.here:
    print(json.dumps(compile_here(targets, args.seq_len, args.batch_size)))
    return 0
  rows = _runs.compile_in_aot_venvs(__file__, targets, [f"--seq_len={args.seq_len}", f"--batch_size={args.batch_size}"])
  print(f"\ndefault config, bf16, {args.batch_size} x {args.seq_len} tokens, batch over every chip")
  print(f"{'target':<8} {'attention':<9} {'temp MB':>8} {'est. ms':>8}  fused kernels")
  for r in rows:
    est = f"{r['optimal_seconds'] * 1e3:.2f}" if r["optimal_seconds"] else "-"
    print(f"{r['target']:<8} {r['attention']:<9} {r['temp_bytes'] / 1e6:>8.1f} {est:>8}  {r['fused_calls']}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"command": "python benchmarks/attention_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seq_len": args.seq_len, "batch_size": args.batch_size, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")
  return 0


def _suppress():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  run_command(main)
