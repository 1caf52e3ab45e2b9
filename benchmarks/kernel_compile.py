"""Deviceless compile report of the embedding-bag kernels for real TPU and NVIDIA targets.

Nothing runs on an accelerator: each kernel is traced from ShapeDtypeStructs on one device of a
target's topology, lowered and compiled by that target's own compiler (Mosaic/libtpu; XLA GPU +
Triton + ptxas), and its memory analysis (per-device argument/output/temporary bytes), compile time
and, on TPU, XLA's ``optimal_seconds`` (a cost model: it adds each kernel's ``pl.CostEstimate``)
are recorded beside the roofline time (the bytes the kernel moves / the chip's HBM bandwidth; see
``pallas_tpu.roofline_seconds``). GPU rows add what the compiler reported per Triton kernel: the
launch's shared memory (XLA's thunk sequence) and ptxas's registers and spills (``ptxas -v`` on the
dumped PTX).

  python benchmarks/kernel_compile.py --quick   # one shape per target (CI); ~minutes
  python benchmarks/kernel_compile.py           # every kernel x target x shape; long (see README)

Run with any python: it builds/reuses the accelerator-compiler venvs (``.ci/aot_env.sh``) and runs
itself in them (``--platform tpu|cuda``, one process per platform), then merges and prints a table.
Results: benchmarks/results/kernel_compile.json (full) or kernel_compile_quick.json (``--quick``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGETS = {  # name -> (platform, topology name or spec file, HBM bytes/s)
    "v5e": ("tpu", "v5e:2x2", 819e9),
    "v5p": ("tpu", "v5p:2x2x1", 2765e9),
    "v6e": ("tpu", "v6e:2x2", 1640e9),
    # NVIDIA's H100 SXM page: 3.35 TB/s; the XLA spec says memory_bandwidth 3352320000000.
    "h100": ("cuda", "h100_sxm.txtpb", 3.35e12),
    # NVIDIA's H200 page: 4.8 TB/s (the XLA spec's memory_bandwidth is the same).
    "h200": ("cuda", "h200.txtpb", 4.8e12),
}
M = 2**20
BAGS = 8192
FULL_SHAPES = [(d, dt, bag) for d in (1024, 2048, 4096) for dt in ("float32", "bfloat16") for bag in (128, 256)]
QUICK_SHAPES = [(1024, "bfloat16", 128)]
TPU_KERNELS = ("forward", "weight_grad", "segment_sum")
GPU_KERNELS = ("forward", "weight_grad", "segment_sum")
# The end-to-end row gradients (XLA's sort of the lookups + the segment sum) compile slowly (a sort of
# 1M keys: ~1 min on 2 cores): once per TPU target, at the first shape.
E2E_KERNELS = ("row_grads",)


# ----- one platform, inside its AOT venv -------------------------------------------------------------


def _sds(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _programs(platform, d, dtype, bag, sharding):
  """kernel name -> (function, argument ShapeDtypeStructs, roofline kernel name)."""
  import jax.numpy as jnp

  from memjax.kernels import pallas_gpu, pallas_tpu

  n = BAGS * bag
  values = _sds((M, d), jnp.dtype(dtype), sharding)
  idx = _sds((BAGS, bag), jnp.int32, sharding)
  w = _sds((BAGS, bag), jnp.float32, sharding)
  dout = _sds((BAGS, d), jnp.float32, sharding)
  sorted_i32 = _sds((n,), jnp.int32, sharding)
  sorted_f32 = _sds((n,), jnp.float32, sharding)
  if platform == "tpu":
    bs = pallas_tpu.BlockSizes.for_shape(bag, d)

    def segment_sum(src, w_n, key, g):  # the row-gradient kernel on lookups already sorted by row
      import jax
      out = jax.ShapeDtypeStruct((n, d), jnp.float32)  # run sums, then zeros from the last run on
      return pallas_tpu._segment_sum(src, w_n, key, g, out, False, bs, False)

    return {
        "forward": (lambda v, i, ww: pallas_tpu.forward(v, i, ww), (values, idx, w), "forward"),
        "weight_grad": (lambda v, i, g: pallas_tpu._weight_grad(v, i, g, bs, False), (values, idx, dout),
                        "weight_grad"),
        "segment_sum": (segment_sum, (sorted_i32, sorted_f32, sorted_i32, dout), "row_grads"),
        "row_grads": (lambda i, ww, g: pallas_tpu.row_grads(i, ww, g, M), (idx, w, dout), "row_grads"),
    }, bs
  bs = pallas_gpu.BlockSizes.for_shape(bag, d)
  offsets = _sds((n + 1,), jnp.int32, sharding)

  def segment_sum(off, order, w_n, g):  # one output row per run of sorted lookups
    return pallas_gpu._segment_sum_call(off, order, w_n, g, bag, jnp.float32, bs, False)

  return {
      "forward": (lambda v, i, ww: pallas_gpu._forward_call(v, i, ww, bs, False), (values, idx, w), "forward"),
      "weight_grad": (lambda v, i, g: pallas_gpu._weight_grad_call(v, i, g, bs, False), (values, idx, dout),
                      "weight_grad"),
      "segment_sum": (segment_sum, (offsets, sorted_i32, sorted_f32, dout), "row_grads"),
  }, bs


def _device(target):
  import jax
  from jax.experimental import topologies

  platform, name, _ = TARGETS[target]
  if platform == "tpu":
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  else:
    spec = (REPO / "memjax" / "scale" / "targets" / name).read_text()
    topo = topologies.get_topology_desc(platform="cuda", target_config=spec, topology="1x1x1")
  return topo.devices[0]


def _ptxas():
  hits = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cuda_nvcc", "bin", "ptxas"))
  return hits[0] if hits else None


def _gpu_report(dump_dir):
  """Per Triton kernel: shared memory of its launch, registers and spills from ptxas -v."""
  report = {}
  for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
    for m in re.finditer(r"kCustomKernel.*? (memjax_\w+) grid: \[([^\]]*)\] threads: \[([^\]]*)\]\s+shared_memory: (\d+) bytes",
                         pathlib.Path(path).read_text()):
      report.setdefault(m.group(1), {}).update(grid=m.group(2), threads=m.group(3), shared_memory_bytes=int(m.group(4)))
  ptxas = _ptxas()
  for path in glob.glob(os.path.join(dump_dir, "*.ptx")) if ptxas else []:
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for m in re.finditer(r"entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
                         out, re.S):
      if m.group(1).startswith("memjax_"):
        report.setdefault(m.group(1), {}).update(spill_store_bytes=int(m.group(2)),
                                                 spill_load_bytes=int(m.group(3)), registers=int(m.group(4)))
  return report


def _compile_one(target, kernel, d, dtype, bag, options=None):
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from memjax.kernels import pallas_tpu

  platform, _, bandwidth = TARGETS[target]
  dev = _device(target)
  sharding = NamedSharding(Mesh(np.array([dev]), ("x",)), PartitionSpec())
  programs, bs = _programs(platform, d, dtype, bag, sharding)
  fn, args, roof_kernel = programs[kernel]
  row = {"target": target, "device": dev.device_kind, "kernel": kernel, "num_slots": M, "value_dim": d,
         "dtype": dtype, "bags": BAGS, "bag_size": bag, "block_sizes": repr(bs)}
  roof = pallas_tpu.roofline_seconds(roof_kernel, num_slots=M, value_dim=d, bags=BAGS, bag_size=bag,
                                     value_dtype=dtype, chip="v5p")
  row.update(compulsory_bytes=roof["compulsory_bytes"], moved_bytes=roof["moved_bytes"],
             roofline_seconds=roof["moved_bytes"] / bandwidth, compulsory_seconds=roof["compulsory_bytes"] / bandwidth,
             hbm_bytes_per_second=bandwidth)
  if platform == "cuda":  # Triton moves bf16 rows as they are: no word rows
    row["moved_bytes"] = row["compulsory_bytes"]
    row["roofline_seconds"] = row["compulsory_seconds"]
  start = time.time()
  try:
    compiled = jax.jit(fn).trace(*args).lower().compile(compiler_options=options)
  except Exception as e:  # noqa: BLE001 (the compiler's message is the result)
    row.update(status="error", error=str(e).splitlines()[0][:400], compile_seconds=time.time() - start)
    return row
  row["compile_seconds"] = time.time() - start
  ma = compiled.memory_analysis()
  row.update(status="ok", argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
             temp_bytes=ma.temp_size_in_bytes, alias_bytes=ma.alias_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  for key, name in (("optimal_seconds", "optimal_seconds"), ("bytes accessed", "cost_bytes_accessed"),
                    ("flops", "cost_flops")):
    if key in cost:
      row[name] = float(cost[key])
  return row


def _run_platform(platform, quick, out_path, only):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  shapes = QUICK_SHAPES if quick else FULL_SHAPES
  targets = [t for t, (p, _, _) in TARGETS.items() if p == platform and (not only or t in only)]
  kernels = TPU_KERNELS if platform == "tpu" else GPU_KERNELS
  for target in targets:
    todo = [(k, *s) for s, k in itertools.product(shapes, kernels)]
    if platform == "tpu" and (not quick or target == "v5p"):
      todo += [(k, *shapes[0]) for k in E2E_KERNELS]
    for kernel, d, dtype, bag in todo:
      options = None
      if platform == "cuda":  # the thunk sequence and PTX that _gpu_report reads
        dump = tempfile.mkdtemp(prefix="memjax_gpu_dump_")
        options = {"xla_dump_to": dump}
      row = _compile_one(target, kernel, d, dtype, bag, options)
      if platform == "cuda":
        report = _gpu_report(dump)
        row["gpu_kernels"] = report
        subprocess.run(["rm", "-rf", dump], check=False)
      rows.append(row)
      print(_line(row), flush=True)
      pathlib.Path(out_path).write_text(json.dumps(rows, indent=1))
  return rows


# ----- the driver ------------------------------------------------------------------------------------


def _mib(x):
  return "-" if x is None else f"{x / 2**20:.1f}"


def _line(r):
  shape = f"{r['value_dim']:>4} {r['dtype']:<8} L={r['bag_size']:<3}"
  if r["status"] != "ok":
    return f"{r['target']:<5} {r['kernel']:<12} {shape}  ERROR {r['error'][:90]}"
  opt = r.get("optimal_seconds")
  extra = ""
  for name, k in (r.get("gpu_kernels") or {}).items():
    extra += (f" {name.replace('memjax_bag_', '')}: smem {k.get('shared_memory_bytes', '?')} B, "
              f"{k.get('registers', '?')} regs, spills {k.get('spill_store_bytes', '?')}")
  return (f"{r['target']:<5} {r['kernel']:<12} {shape}  arg {_mib(r['argument_bytes']):>8}  out "
          f"{_mib(r['output_bytes']):>7}  temp {_mib(r['temp_bytes']):>6} MiB  compile {r['compile_seconds']:5.1f} s  "
          f"roofline {r['roofline_seconds'] * 1e3:7.2f} ms  optimal "
          f"{'-' if opt is None else f'{opt * 1e3:.2f} ms':>9}{extra}")


def _aot_pythons():
  out = subprocess.run(["bash", str(REPO / ".ci" / "aot_env.sh")], capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write(out.stderr)
    raise SystemExit(f"aot_env.sh failed ({out.returncode})")
  tpu, cuda = out.stdout.split()
  return {"tpu": tpu, "cuda": cuda}


def main():
  from memjax.command import ArgumentParser
  ap = ArgumentParser(prog="benchmarks/kernel_compile.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="one shape per target")
  ap.add_argument("--platform", choices=("tpu", "cuda"), help="compile in this process (inside an AOT venv)")
  ap.add_argument("--targets", default="", help="comma-separated subset of " + ",".join(TARGETS))
  ap.add_argument("--json", help="where --platform writes its rows")
  args = ap.parse_args()
  only = [t for t in args.targets.split(",") if t]
  if args.platform:
    _run_platform(args.platform, args.quick, args.json or os.devnull, only)
    return
  pythons = _aot_pythons()
  rows, start = [], time.time()
  for platform in ("tpu", "cuda"):
    if only and not any(TARGETS[t][0] == platform for t in only):
      continue
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      part = f.name
    cmd = [pythons[platform], __file__, "--platform", platform, "--json", part] + (["--quick"] if args.quick else [])
    cmd += ["--targets", args.targets] if args.targets else []
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f"{platform} compile run failed ({proc.returncode})")
    rows += json.loads(pathlib.Path(part).read_text())
    os.unlink(part)
  result = {"jax": _jax_version(pythons["tpu"]), "quick": args.quick, "seconds": time.time() - start,
            "num_slots": M, "bags": BAGS, "rows": rows}
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = RESULTS / ("kernel_compile_quick.json" if args.quick else "kernel_compile.json")
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\n{len(rows)} compiles ({sum(r['status'] == 'ok' for r in rows)} ok) in {result['seconds']:.0f} s -> "
        f"{out.relative_to(REPO)}")


def _jax_version(python):
  return subprocess.run([python, "-c", "import jax; print(jax.__version__)"], capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.strip()


if __name__ == "__main__":
  from memjax.command import run_command
  run_command(main)
