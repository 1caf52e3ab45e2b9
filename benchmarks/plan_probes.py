"""Probes of what the TPU and CUDA compilers keep, behind the planner's "tpu" and "gpu" models.

  python benchmarks/plan_probes.py                  # every probe (~18 min on 2 cores)
  python benchmarks/plan_probes.py --only=tpu_r3    # the probes whose name starts with tpu_r3
  python benchmarks/plan_probes.py --only=tpu_sparse,gpu_sparse   # several prefixes

With --only, the rows of the probes run replace theirs in the JSON already there; the others stay.

Each probe compiles one train step for a real target (deviceless AOT, in the venvs of
``.ci/aot_env.sh``) with one thing varied against its neighbour: the value table's size (1 or 4 GiB a
device), the readers of the shared table (1, 2, 3), microbatches, the mesh, the batch, the depth. The
differences between neighbours give the planner's coefficients (docs/planner.md); the table printed
is the compiler's temporaries beside the plan's (``memjax.plan`` with ``compiler_for(platform)``).
A step over the target's HBM does not compile: the TPU compiler then names the temporaries it needed,
and the probe records that figure. Writes ``benchmarks/results/plan_probes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

# 373M blocks cut to 6 layers at 4 x 512 tokens, remat full: the dense update's value gradients dominate.
_SMALL = {"model.num_layers": "6", "model.memory.layers": "1,3,5", "model.remat": "full",
          "model.memory.value_update": "dense", "train.batch_size": "4", "train.seq_len": "512",
          "train.microbatches": "1"}
_M114 = {"data": 1, "fsdp": 1, "memory": 4}
_M141 = {"data": 1, "fsdp": 4, "memory": 1}
_M181 = {"data": 1, "fsdp": 8, "memory": 1}
# The 8B at full depth with a 65k-slot table (256 MiB a device): what the dense parameters cost.
_8B = {"model.memory.n_keys": "256", "model.remat": "full", "model.memory.value_update": "dense",
       "train.batch_size": "2", "train.seq_len": "4096", "train.microbatches": "2"}
# 373M blocks cut to 6 layers, remat none, at 2 x 2048 tokens a device (fsdp 8).
_GPU = {"model.num_layers": "6", "model.memory.layers": "1,3,5", "model.remat": "none",
        "model.memory.value_update": "sparse", "train.batch_size": "16", "train.seq_len": "2048",
        "train.microbatches": "1"}


def _with(base: dict, **changes) -> dict:
  return {**base, **{k.replace("__", "."): v for k, v in changes.items()}}


PROBES = [  # (name, config, target, mesh, overrides)
    ("tpu_r3_v1_k1", "paper_373m", "v5p-8", _M114, _SMALL),
    ("tpu_r3_v4_k1", "paper_373m", "v5p-8", _M114, _with(_SMALL, model__memory__n_keys="2048")),
    ("tpu_r3_v1_k2", "paper_373m", "v5p-8", _M114, _with(_SMALL, train__microbatches="2")),
    ("tpu_r3_v4_k2", "paper_373m", "v5p-8", _M114,
     _with(_SMALL, model__memory__n_keys="2048", train__microbatches="2")),
    ("tpu_r2_v1_k1", "paper_373m", "v5p-8", _M114, _with(_SMALL, model__memory__layers="2,4")),
    ("tpu_r2_v4_k1", "paper_373m", "v5p-8", _M114,
     _with(_SMALL, model__memory__layers="2,4", model__memory__n_keys="2048")),
    ("tpu_r1_v1_k1", "paper_373m", "v5p-8", _M114, _with(_SMALL, model__memory__layers="3")),
    ("tpu_r1_v4_k1", "paper_373m", "v5p-8", _M114,
     _with(_SMALL, model__memory__layers="3", model__memory__n_keys="2048")),
    ("tpu_fsdp4_r3_v4_k2", "paper_373m", "v5p-8", _M141, _with(_SMALL, train__microbatches="2")),
    ("tpu_fsdp4_r3_v16_k2", "paper_373m", "v5p-8", _M141,
     _with(_SMALL, train__microbatches="2", model__memory__n_keys="2048")),
    ("tpu_8b_16_layers_k2", "paper_8b", "v5p-8", _M114,
     _with(_8B, model__num_layers="16", model__memory__layers="4,8,12")),
    ("tpu_8b_32_layers_k2", "paper_8b", "v5p-8", _M114, _8B),
    ("tpu_8b_32_layers_k1", "paper_8b", "v5p-8", _M114, _with(_8B, train__microbatches="1")),
    ("tpu_373m_sparse_b16", "paper_373m", "v5p-8", _M141,
     {"train.batch_size": "16", "model.remat": "none", "model.memory.value_update": "sparse"}),
    ("tpu_sparse_fsdp4_b8", "paper_373m", "v5p-8", _M141,
     _with(_SMALL, model__remat="none", model__memory__value_update="sparse",
           train__batch_size="8", train__seq_len="2048")),
    ("tpu_sparse_fsdp32_b64", "paper_373m", "v5p-64", {"data": 1, "fsdp": 32, "memory": 1},
     _with(_SMALL, model__remat="none", model__memory__value_update="sparse",
           train__batch_size="64", train__seq_len="2048")),
    ("gpu_sparse_b16", "paper_373m", "h200-8", _M181, _GPU),
    ("gpu_sparse_b32", "paper_373m", "h200-8", _M181, _with(_GPU, train__batch_size="32")),
    ("gpu_dense_v4_k1", "paper_373m", "h200-8", _M181, _with(_GPU, model__memory__value_update="dense")),
    ("gpu_dense_v4_k2", "paper_373m", "h200-8", _M181,
     _with(_GPU, model__memory__value_update="dense", train__batch_size="32", train__microbatches="2")),
    ("gpu_dense_v16_k1", "paper_373m", "h200-8", _M181,
     _with(_GPU, model__memory__value_update="dense", model__memory__n_keys="2048")),
    ("gpu_dense_v16_k2", "paper_373m", "h200-8", _M181,
     _with(_GPU, model__memory__value_update="dense", model__memory__n_keys="2048", train__batch_size="32",
           train__microbatches="2")),
]

GIB = 2**30


def _run_platform(platform: str, names: list[str], out_path: str) -> None:
  import jax
  jax.config.update("jax_platforms", "cpu")
  from compile_table import oom_temp_bytes
  from memjax.scale.compile import compile_step
  from memjax.scale.plan import compiler_for, load_config, plan
  from memjax.scale.targets import get
  rows = []
  for name, config, target, mesh, overrides in PROBES:
    if name not in names or get(target).platform != platform:
      continue
    cfg = load_config(os.path.join(REPO, "configs", config + ".py"), list(overrides.items()))
    p = plan(cfg.model, cfg.train, mesh, compiler=compiler_for(platform))
    row = {"name": name, "config": config, "target": target, "mesh": mesh, "overrides": overrides,
           "plan_temp_bytes": p["temp_bytes"], "plan_activations_bytes": p["activations_bytes"],
           "plan_update_bytes": p["gradients_bytes"], "plan_arguments_bytes": p["arguments_bytes"]}
    t0 = time.time()
    try:
      r = compile_step(cfg, target, mesh)
      row["compiler_temp_bytes"] = r["bytes_per_device"]["temp"]
      row["compiler_argument_bytes"] = r["bytes_per_device"]["argument"]
    except Exception as e:  # noqa: BLE001 - out of HBM: the TPU compiler names what it needed
      row["error"] = " ".join(str(e).split())[:300]
      row["compiler_temp_bytes"] = oom_temp_bytes(str(e))
      row["compiler_temp_needed_not_fitting"] = True
    row["compile_seconds"] = round(time.time() - t0, 1)
    rows.append(row)
    print(json.dumps({k: row.get(k) for k in ("name", "compiler_temp_bytes", "plan_temp_bytes", "compile_seconds")}),
          flush=True)
    with open(out_path, "w") as f:
      json.dump(rows, f, indent=1)


def format_table(rows: list[dict]) -> str:
  lines = ["| probe | mesh d/f/m | compiler temporaries GiB | plan GiB | plan error |", "|---|---|---|---|---|"]
  for r in rows:
    c, p = r.get("compiler_temp_bytes"), r["plan_temp_bytes"]
    m = r["mesh"]
    needed = " (needed; out of HBM)" if r.get("compiler_temp_needed_not_fitting") else ""
    cell = f"{c / GIB:.2f}{needed}" if c else "failed"
    err = f"{p / c - 1:+.0%}" if c else "-"
    lines.append(f"| {r['name']} | {m['data']}/{m['fsdp']}/{m['memory']} | {cell} | {p / GIB:.2f} | {err} |")
  return "\n".join(lines)


def main() -> int:
  from compile_table import rows_from_aot_venv
  from memjax.command import ArgumentParser
  ap = ArgumentParser(prog="benchmarks/plan_probes.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help="run the probes whose name starts with one of these (comma-separated); "
                  "their rows replace those in --out, the rest stay")
  ap.add_argument("--platform", choices=("tpu", "cuda"), help="(internal) compile in this process")
  ap.add_argument("--names", help="(internal) comma-separated probe names")
  ap.add_argument("--json", help="(internal) where --platform writes its rows")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "plan_probes.json"))
  args = ap.parse_args()
  if args.platform:
    _run_platform(args.platform, (args.names or "").split(","), args.json)
    return 0
  prefixes = tuple(p for p in args.only.split(",") if p) or ("",)  # "tpu," is "tpu", not every probe
  names = [p[0] for p in PROBES if p[0].startswith(prefixes)]
  if not names:
    ap.error(f"--only={args.only!r} matches no probe; names: {[p[0] for p in PROBES]}")
  start, rows = time.time(), []
  for platform in ("tpu", "cuda"):
    mine = [n for n in names if n.startswith("tpu" if platform == "tpu" else "gpu")]
    if not mine:
      continue
    rows += rows_from_aot_venv(platform, __file__, ["--names", ",".join(mine)])
  command = "python benchmarks/plan_probes.py " + " ".join(sys.argv[1:])
  result = {"command": command.strip(), "seconds": round(time.time() - start), "rows": rows}
  if args.only and os.path.exists(args.out):  # keep the probes not run, in PROBES order
    with open(args.out) as f:
      earlier = json.load(f)
    fresh = {r["name"]: {**r, "command": command.strip()} for r in rows}
    kept = {r["name"]: r for r in earlier["rows"]}
    rows = [fresh.get(n) or kept[n] for n, *_ in PROBES if n in fresh or n in kept]
    result = {"command": earlier["command"], "seconds": earlier["seconds"], "rows": rows,
              "rerun": earlier.get("rerun", []) + [{"command": command.strip(), "seconds": result["seconds"]}]}
  print(format_table(rows))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from memjax.command import run_command
  run_command(main)
