"""The paper's configs on real targets, checked by the accelerators' own compilers (deviceless AOT).

  python benchmarks/compile_table.py                    # 373M, 1.3B, 8B x v5e-16, v5p-8, v5p-64, h100-8, h200-8
  python benchmarks/compile_table.py --configs=paper_373m --targets=v5p-8

For each config and target, at the config's global batch: the planner (``memjax.plan``, with the
target's compiler model) picks the layout that fits the target's HBM with the least recomputation:
remat "none", then "matmuls", then "full", each with the sparse or the dense value update and the
fewest microbatches, over every mesh data x fsdp x memory of the target's chips (the smallest planned
footprint); if nothing fits, the smallest footprint found. Then the train step is compiled for the
target with ``memjax.scale.compile.compile_step``; when the compiler finds it over the HBM (and the
plan's exact arguments fit), the planner chooses again under a budget scaled by its error on that
layout (``--tries`` compiles at most, 2 by default; the layouts given up in ``earlier_attempts``). The
table reports the compiler's per-device bytes, whether it fits, its step-time estimate (TPU; a cost
model; for a microbatched step that fits, derived with ``price_microbatches``: docs/compile.md) with
the tokens/s and MFU that implies, and the planner's error against the compiler. Each target's compiles
run in the venv of ``.ci/aot_env.sh`` for its platform. Writes ``benchmarks/results/compile_table.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("paper_373m", "paper_1b3", "paper_8b")
TARGET_NAMES = ("v5e-16", "v5p-8", "v5p-64", "h100-8", "h200-8")
HEADROOM = 0.9  # plan to 90% of HBM: the planner is an estimate


def _powers_of_two(n: int) -> list[int]:
  return [2**i for i in range(int(math.log2(n)) + 1) if n % 2**i == 0]


def choose_layout(config_path: str, target, compiler: str, budget: float | None = None):
  """(overrides, mesh, plan) of the cheapest layout the planner says fits in ``budget`` bytes a device
  (default ``HEADROOM`` x the target's HBM), or the smallest one."""
  from memjax.scale.plan import load_config, plan
  budget = HEADROOM * target.hbm_bytes if budget is None else budget
  base = load_config(config_path)
  best = None
  for remat, update in [(r, u) for r in ("none", "matmuls", "full") for u in ("sparse", "dense")]:
    for micro in _powers_of_two(base.train.batch_size):
      fitting = []
      for memory in _powers_of_two(target.chips):
        for fsdp in _powers_of_two(target.chips // memory):
          data = target.chips // (memory * fsdp)
          if base.train.batch_size % (micro * data * fsdp):
            continue
          overrides = [("model.remat", remat), ("train.microbatches", str(micro)), ("model.memory.value_update", update)]
          try:
            cfg = load_config(config_path, overrides)
          except ValueError:
            continue
          if base.model.memory.layer.value_dim % memory and base.model.memory.value_sharding == "column":
            continue
          sizes = {"data": data, "fsdp": fsdp, "memory": memory}
          p = plan(cfg.model, cfg.train, sizes, compiler=compiler)
          total = p["arguments_bytes"] + p["temp_bytes"]
          fitting.append((total, overrides, sizes, p))
          if best is None or total < best[0]:
            best = (total, overrides, sizes, p)
      fits = [f for f in fitting if f[0] <= budget]
      if fits:
        return min(fits, key=lambda f: f[0])[1:]
  return best[1:]


def _compile_row(name: str, path: str, target, overrides, sizes, p) -> dict:
  """One table row: the layout compiled for ``target`` (priced if it fits), or the compiler's error."""
  from memjax.scale.compile import compile_step
  from memjax.scale.plan import load_config
  cfg = load_config(path, overrides)
  row = {"config": name, "target": target.name, "mesh": sizes, "overrides": dict(overrides),
         "plan_total_bytes": p["arguments_bytes"] + p["temp_bytes"]}
  try:
    r = compile_step(cfg, target, sizes, price_microbatches=True)
    row.update(r)
    row["plan_error"] = row["plan_total_bytes"] / r["total_bytes_per_device"] - 1
  except Exception as e:  # noqa: BLE001 - e.g. out of HBM: the table says so
    row["error"] = " ".join(str(e).split())[:300]
    temp = oom_temp_bytes(str(e))
    if temp is not None:  # the TPU compiler names what the temporaries need: compare the plan's
      row["compiler_temp_bytes_needed"] = temp
      row["plan_temp_error"] = p["temp_bytes"] / temp - 1
  return row


def _compiler_total(row: dict) -> int | None:
  """What the compiler says the row needs a device (arguments + temporaries), or None if unknown."""
  if "total_bytes_per_device" in row:
    return row["total_bytes_per_device"]
  if "compiler_temp_bytes_needed" in row:  # out of HBM: the temporaries it named + the (exact) planned arguments
    return row["compiler_temp_bytes_needed"] + row["plan_arguments_bytes"]
  return None


def _run_platform(platform: str, configs, targets, out_path: str, tries: int = 1) -> None:
  import jax
  jax.config.update("jax_platforms", "cpu")
  from memjax.scale.plan import compiler_for
  from memjax.scale.targets import get
  compiler = compiler_for(platform)
  rows = []
  for name in configs:
    path = os.path.join(REPO, "configs", name + ".py")
    for t in targets:
      target = get(t)
      if target.platform != platform:
        continue
      # The planner picks; the compiler checks. A layout the compiler finds over the HBM (while the
      # plan's exact arguments fit) is replaced, up to `tries` compiles, by the planner's choice under a
      # budget scaled by the plan's error on it: the compiler's figure calibrates the next choice.
      budget, attempts, row = HEADROOM * target.hbm_bytes, [], None
      for _ in range(tries):
        overrides, sizes, p = choose_layout(path, target, compiler, budget)
        tried = attempts + ([row] if row else [])
        if any(a["mesh"] == sizes and a["overrides"] == dict(overrides) for a in tried):
          break  # the budget no longer changes the choice: keep the last compiled row
        if row is not None:
          attempts.append({k: row.get(k) for k in ("mesh", "overrides", "plan_total_bytes", "total_bytes_per_device",
                                                    "compiler_temp_bytes_needed", "fits")})
        row = _compile_row(name, path, target, overrides, sizes, p)
        row["plan_arguments_bytes"] = p["arguments_bytes"]
        total = _compiler_total(row)
        if row.get("fits") or total is None or p["arguments_bytes"] > target.hbm_bytes:
          break
        budget *= row["plan_total_bytes"] / total
      row["earlier_attempts"] = attempts
      rows.append(row)
      print(json.dumps({k: row.get(k) for k in ("config", "target", "mesh", "overrides", "fits", "plan_error",
                                                 "compile_seconds", "error")}), flush=True)
      with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_temp_bytes(message: str) -> int | None:
  """Bytes of HLO temporaries an out-of-HBM compile error names, or None.

  >>> oom_temp_bytes("... the total memory required for HLO temporaries (21.77G) exceeds available HBM (15.75G).")
  23375359508
  """
  m = re.search(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\)", message)
  return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


def _aot_python(platform: str) -> str:
  out = subprocess.run(["bash", os.path.join(REPO, ".ci", "aot_env.sh"), platform], stdout=subprocess.PIPE,
                       text=True, check=True)
  return out.stdout.strip()


def rows_from_aot_venv(platform: str, script: str, args: list[str]) -> list[dict]:
  """Runs ``script --platform PLATFORM --json PART *args`` in the venv of ``.ci/aot_env.sh`` for the
  platform (the target's compiler, this CPU as the host) and returns the rows it wrote to PART."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    part = f.name
  cmd = [_aot_python(platform), script, "--platform", platform, "--json", part, *args]
  subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
                           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}, check=True)
  with open(part) as f:
    return json.load(f)


def main() -> int:
  from memjax.command import ArgumentParser
  ap = ArgumentParser(prog="benchmarks/compile_table.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--targets", default=",".join(TARGET_NAMES))
  ap.add_argument("--tries", type=int, default=2,
                  help="compiles per row: a layout the compiler finds over the HBM is replaced by the planner's "
                       "choice under a budget scaled by its error on it (1: the planner's first choice only)")
  ap.add_argument("--platform", choices=("tpu", "cuda"), help="(internal) compile in this process")
  ap.add_argument("--json", help="(internal) where --platform writes its rows")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "compile_table.json"))
  args = ap.parse_args()
  if args.tries < 1:
    ap.error(f"--tries={args.tries}: compile each row at least once (--tries >= 1)")
  configs, targets = args.configs.split(","), args.targets.split(",")
  from memjax.scale.targets import get
  for t in targets:
    try:
      get(t)
    except ValueError as e:
      ap.error(str(e).replace("--target=", "--targets: "))
  for name in configs:
    if not os.path.exists(os.path.join(REPO, "configs", name + ".py")):
      ap.error(f"--configs: {name!r} is not a file under configs/ (e.g. {', '.join(CONFIGS)})")
  if args.platform:
    _run_platform(args.platform, configs, targets, args.json, args.tries)
    return 0
  start, rows = time.time(), []
  for platform in ("tpu", "cuda"):
    if not any(get(t).platform == platform for t in targets):
      continue
    rows += rows_from_aot_venv(platform, __file__, ["--configs", args.configs, "--targets", args.targets,
                                                     "--tries", str(args.tries)])
  result = {"command": "python benchmarks/compile_table.py " + " ".join(sys.argv[1:]), "seconds": time.time() - start,
            "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from memjax.command import run_command
  run_command(main)
