"""Checks ``memjax.plan`` against XLA: compiles the sharded train step ahead of time on fake CPU
devices from ShapeDtypeStructs (nothing allocated) and compares ``compiled.memory_analysis()``
(``memjax.scale.plan.compare_with_xla``).

  python benchmarks/plan_check.py --config=configs/paper_373m.py --devices=8 --mesh data=8 \
      --mesh data=2,memory=4 --mesh data=2,memory=4:row --value_update=dense,sparse \
      --batch_size=8 --seq_len=512 [--out=benchmarks/results/plan_check.json]

``--mesh`` repeats; a ``:row`` suffix checks row-sharded values (default column). Every mesh is
checked with every value update listed; each row of ``--out`` records the command that made it.
"""

import json
import os
import sys

from memjax.command import ArgumentParser, run_command


def main() -> int:
  parser = ArgumentParser(prog="benchmarks/plan_check.py")
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", action="append", help="repeatable; data=2,memory=4[:row]")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--seq_len", type=int)
  parser.add_argument("--value_update", help="comma list, e.g. dense,sparse")
  parser.add_argument("--out")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"  # before JAX starts
  from memjax.scale import plan
  command = "python " + " ".join(sys.argv)
  meshes = [(plan.parse_mesh(text), mode) for text, _, mode in (m.partition(":") for m in args.mesh or ["data=8"])]
  for sizes, mode in meshes:
    for update in (args.value_update.split(",") if args.value_update else [None]):
      r = plan.compare_with_xla(args.config, sizes, batch_size=args.batch_size, seq_len=args.seq_len,
                                value_update=update, value_sharding=mode or None)
      r["devices"], r["command"] = args.devices, command
      print(json.dumps(r, indent=1), flush=True)
      if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        json.dump(old + [r], open(args.out, "w"), indent=1)
  return 0


if __name__ == "__main__":
  run_command(main)
