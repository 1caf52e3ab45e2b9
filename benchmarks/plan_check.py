"""Checks ``memjax.plan`` against XLA: compiles the sharded train step ahead of time on fake CPU
devices from ShapeDtypeStructs (nothing allocated) and compares ``compiled.memory_analysis()``.

  python benchmarks/plan_check.py --config=configs/paper_373m.py --devices=8 --mesh data=8 \
      --mesh data=2,memory=4 --mesh data=2,memory=4:row --value_update=dense,sparse \
      --batch_size=8 --seq_len=512 [--out=benchmarks/results/plan_check.json]

``--mesh`` repeats; a ``:row`` suffix checks row-sharded values (default column). Every mesh is
checked with every value update listed; each row of ``--out`` records the command that made it.

Compared per device: arguments (parameters + optimizer state + batch) with XLA's argument bytes;
temporaries (gradients + activations) with XLA's temp bytes; their sum with argument + output + temp
(outputs alias the donated state, so XLA's output is counted once in "total").
"""

import argparse
import json
import os
import sys
import time


def check(config_path: str, sizes: dict, *, batch_size=None, seq_len=None, value_update=None,
          value_sharding=None, backend="xla") -> dict:
  import dataclasses

  from memjax import comms, plan
  cfg = plan.load_config(config_path)
  train = dataclasses.replace(cfg.train, **{k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len))
                                            if v is not None})
  model = cfg.model
  for field, value in (("value_update", value_update), ("value_sharding", value_sharding)):
    if value is not None:
      model = dataclasses.replace(model, memory=dataclasses.replace(model.memory, **{field: value}))
  p = plan.plan(model, train, sizes)
  t0 = time.time()
  compiled, *_ = comms.compile_train_step(model, train, sizes, backend=backend)
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  xla = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  xla_total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
  planned_args = p["arguments_bytes"]
  planned_temp = p["temp_bytes"]
  planned_total = planned_args + planned_temp
  err = lambda a, b: (a - b) / b
  colls = comms.collectives(compiled)
  return {"config": config_path, "mesh": sizes, "batch_size": train.batch_size, "seq_len": train.seq_len,
          "value_update": model.memory.value_update, "value_sharding": model.memory.value_sharding,
          "compile_seconds": round(seconds, 1),
          "xla": xla, "xla_total": xla_total,
          "plan": {"arguments": planned_args, "temp": planned_temp, "total": planned_total},
          "error": {"arguments": err(planned_args, xla["argument"]), "temp": err(planned_temp, xla["temp"]),
                    "total": err(planned_total, xla_total)},
          "collectives": comms.summarize(colls), "planned_comm": p["comm_bytes_per_step"]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", action="append", help="repeatable; data=2,memory=4[:row]")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--seq_len", type=int)
  parser.add_argument("--value_update", help="comma list, e.g. dense,sparse")
  parser.add_argument("--out")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from memjax import plan
  command = "python " + " ".join(sys.argv)
  for mesh in args.mesh or ["data=8"]:
    text, _, mode = mesh.partition(":")
    for update in (args.value_update.split(",") if args.value_update else [None]):
      r = check(args.config, plan.parse_mesh(text), batch_size=args.batch_size, seq_len=args.seq_len,
                value_update=update, value_sharding=mode or None)
      r["devices"], r["command"] = args.devices, command
      print(json.dumps(r, indent=1), flush=True)
      if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        json.dump(old + [r], open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
