"""CPU benchmark of memjax's embedding_bag backends against PyTorch's ``embedding_bag``.

Run by hand (never from tests):

  .venv/bin/pip install torch==2.13.0          # the CPU wheel; memjax's `bench` extra
  .venv/bin/python benchmarks/embedding_bag.py            # full: four configs, 10 rounds
  .venv/bin/python benchmarks/embedding_bag.py --quick    # small tables, 5 rounds

For every config the contenders run in alternation within one process (round r runs each of them
once, in a rotating order), so load from other processes on a shared machine hits all of them alike;
the medians over rounds and their ratios to PyTorch are reported. Operations:
  fwd          out = embedding_bag(values, idx, w)
  fwd+bwd      out, d_weights and the row-sparse value gradient (memjax: jax.vjp in the weights +
               ``embedding_bag_row_grads``; torch: ``sparse=True`` and ``.backward``)
  fwd+bwd_dense  out and the dense [M, Dv] value gradient (memjax: the custom VJP; torch: sparse=False)
GB/s counts the bytes an ideal kernel must move (gathered rows, outputs, indices, weights) over the
median time, next to a memcpy measured in the same run (read + write bytes). A roofline note gives
the same bytes at the HBM bandwidth of an H100, a TPU v5e and a TPU v5p. The Pallas backends run on
CPU only in interpret mode, which is not a speed path: they appear in the roofline note only.
Results go to benchmarks/results/embedding_bag.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time

# PyTorch's OpenMP workers spin after each parallel region by default, stealing the cores the next
# contender in the alternation needs; passive waiting keeps the rounds independent (--omp-active).
if "--omp-active" not in sys.argv:
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from memjax.command import ArgumentParser, run_command
from memjax.kernels import cpu as cpu_backend
from memjax.kernels.embedding_bag import embedding_bag, embedding_bag_row_grads

HBM = {"H100 (3.35 TB/s)": 3.35e12, "TPU v5e (819 GB/s)": 819e9, "TPU v5p (2.76 TB/s)": 2.76e12}
FULL = [  # (num_slots M, value_dim D, bags B, bag size L, dtype)
    (2**20, 256, 8192, 32, "float32"),
    (2**20, 256, 8192, 32, "bfloat16"),
    (2**18, 128, 8192, 32, "float32"),
    (2**16, 1024, 1024, 128, "float32"),
]
QUICK = [(2**16, 256, 1024, 32, "float32"), (2**16, 256, 1024, 32, "bfloat16")]
JAX_BACKENDS = ("cpu", "xla_loop", "xla")


def bytes_moved(m, d, b, bag, value_bytes, op):
  """Compulsory traffic of one call (bytes): what a perfect kernel reads and writes."""
  n = b * bag
  fwd = n * d * value_bytes + n * 8 + b * d * 4                 # rows, idx + w, out
  if op == "fwd":
    return fwd
  dw = n * d * value_bytes + b * d * 4 + n * 8                  # rows again, d_out, idx in + dw out
  if op == "fwd+bwd":
    sparse = n * 8 + b * d * 4 + n * 4 + n * d * 4               # idx + w, d_out, rows, grads [N, D]
    return fwd + dw + sparse
  return fwd + dw + n * 8 + b * d * 4 + m * d * value_bytes     # dense: the whole [M, D] written


def memcpy_gbps(size=512 << 20, reps=7):
  src = np.ones(size, np.uint8)
  dst = np.empty_like(src)
  dst[:] = 0  # fault the pages in first
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t)
  t = statistics.median(times)
  return {"copy_GBps": size / t / 1e9, "read_plus_write_GBps": 2 * size / t / 1e9}


def _jax_fns(backend, m):
  fwd = jax.jit(lambda v, i, w: embedding_bag(v, i, w, backend=backend))

  @jax.jit
  def fwd_bwd(v, i, w, g):
    out, vjp = jax.vjp(lambda ww: embedding_bag(v, i, ww, backend=backend), w)
    (dw,) = vjp(g.astype(out.dtype))
    rows, grads = embedding_bag_row_grads(i, w, g, m, backend=backend)
    return out, dw, rows, grads

  @jax.jit
  def fwd_bwd_dense(v, i, w, g):
    out, vjp = jax.vjp(lambda vv, ww: embedding_bag(vv, i, ww, backend=backend), v, w)
    return out, *vjp(g.astype(out.dtype))

  return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd_dense": fwd_bwd_dense}


def _torch_fns(torch, idx, w, values, dout):
  f = torch.nn.functional.embedding_bag
  vg = values.detach().clone().requires_grad_(True)
  wg = w.detach().clone().requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return f(idx, values, per_sample_weights=w, mode="sum")

  def fwd_bwd(sparse):
    vg.grad, wg.grad = None, None
    out = f(idx, vg, per_sample_weights=wg, mode="sum", sparse=sparse)
    out.backward(dout)
    return out, vg.grad, wg.grad

  return {"fwd": fwd, "fwd+bwd": lambda: fwd_bwd(True), "fwd+bwd_dense": lambda: fwd_bwd(False)}


def bench_config(m, d, b, bag, dtype, rounds, ops, torch):
  rng = np.random.default_rng(0)
  values = jax.random.normal(jax.random.key(0), (m, d), jnp.float32).astype(dtype)
  idx = jnp.asarray(rng.integers(0, m, (b, bag), dtype=np.int32))
  w = jnp.asarray(rng.random((b, bag), dtype=np.float32))
  dout = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
  values.block_until_ready()

  runs = {}  # (contender, op) -> callable that blocks
  for backend in JAX_BACKENDS:
    fns = _jax_fns(backend, m)
    wt = w.astype(values.dtype) if dtype == "bfloat16" else w
    args = {"fwd": (values, idx, wt), "fwd+bwd": (values, idx, wt, dout), "fwd+bwd_dense": (values, idx, wt, dout)}
    for op in ops:
      runs[(backend, op)] = (lambda f=fns[op], a=args[op]: jax.block_until_ready(f(*a)))
  if torch is not None:
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t_values = torch.from_numpy(np.array(values.astype(jnp.float32))).to(tdtype)
    t_idx = torch.from_numpy(np.array(idx)).long()
    t_w = torch.from_numpy(np.array(w)).to(tdtype)
    t_dout = torch.from_numpy(np.array(dout)).to(tdtype)
    for op, fn in _torch_fns(torch, t_idx, t_w, t_values, t_dout).items():
      if op in ops:
        runs[("torch", op)] = fn

  errors = {}
  for key, fn in list(runs.items()):  # compile and warm up; drop what a library cannot do
    try:
      fn()
    except Exception as e:  # noqa: BLE001  (e.g. a dtype torch's CPU kernel lacks)
      errors["/".join(key)] = f"{type(e).__name__}: {str(e)[:200]}"
      del runs[key]
  times = {key: [] for key in runs}
  keys = list(runs)
  for r in range(rounds):
    for key in keys[r % len(keys):] + keys[: r % len(keys)]:
      t = time.perf_counter()
      runs[key]()
      times[key].append(time.perf_counter() - t)

  value_bytes = jnp.dtype(dtype).itemsize
  result = {"num_slots": m, "value_dim": d, "bags": b, "bag_size": bag, "dtype": dtype, "ops": {}, "errors": errors}
  for op in ops:
    moved = bytes_moved(m, d, b, bag, value_bytes, op)
    entry = {"bytes_moved": moved, "roofline_ms": {k: 1e3 * moved / bw for k, bw in HBM.items()}, "contenders": {}}
    torch_ms = statistics.median(times[("torch", op)]) * 1e3 if ("torch", op) in times else None
    for (who, o), ts in times.items():
      if o != op:
        continue
      ms = statistics.median(ts) * 1e3
      entry["contenders"][who] = {
          "median_ms": ms, "min_ms": min(ts) * 1e3, "GBps": moved / (ms * 1e-3) / 1e9,
          "ratio_vs_torch": (ms / torch_ms) if torch_ms else None}
    result["ops"][op] = entry
  return result


def print_config(res, memcpy):
  head = f"M=2^{int(np.log2(res['num_slots']))} Dv={res['value_dim']} B={res['bags']} L={res['bag_size']} {res['dtype']}"
  print(f"\n{head}   (memcpy read+write {memcpy['read_plus_write_GBps']:.1f} GB/s)")
  print(f"  {'op':<14}{'contender':<10}{'median ms':>10}{'min ms':>9}{'GB/s':>7}{'vs torch':>9}")
  for op, entry in res["ops"].items():
    for who, c in sorted(entry["contenders"].items(), key=lambda kv: kv[1]["median_ms"]):
      ratio = f"{c['ratio_vs_torch']:.2f}x" if c["ratio_vs_torch"] else "-"
      print(f"  {op:<14}{who:<10}{c['median_ms']:>10.1f}{c['min_ms']:>9.1f}{c['GBps']:>7.1f}{ratio:>9}")
  for key, err in res["errors"].items():
    print(f"  skipped {key}: {err}")
  for op, entry in res["ops"].items():
    roof = ", ".join(f"{k}: {v * 1e3:.0f} us" for k, v in entry["roofline_ms"].items())
    print(f"  roofline {op} ({entry['bytes_moved'] / 1e6:.0f} MB moved): {roof}")


def main(argv=None):
  parser = ArgumentParser(prog="benchmarks/embedding_bag.py", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small tables and 5 rounds")
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 10, quick 5)")
  parser.add_argument("--ops", default="fwd,fwd+bwd,fwd+bwd_dense", help="comma-separated operations")
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
  parser.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY unset (spinning workers)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "embedding_bag.json"))
  args = parser.parse_args(argv)
  rounds = args.rounds or (5 if args.quick else 10)
  ops = args.ops.split(",")
  torch = None
  if not args.no_torch:
    try:
      import torch  # noqa: PLC0415
    except ImportError:
      print("torch is not installed: `.venv/bin/pip install torch==2.13.0`; running without it")

  ffi_ok, ffi_message = cpu_backend.ffi_status()
  memcpy = memcpy_gbps()
  meta = {
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rounds": rounds,
      "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_average_start": os.getloadavg()},
      "versions": {"jax": jax.__version__, "torch": getattr(torch, "__version__", None),
                   "python": platform.python_version()},
      "torch_threads": torch.get_num_threads() if torch else None,
      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
      "cpu_ffi": {"available": ffi_ok, "message": ffi_message},
      "memcpy": memcpy,
      "pallas_note": ("pallas_gpu / pallas_tpu run on CPU only in interpret mode, which is not a speed "
                      "path; 'roofline_ms' gives the time the same bytes take at HBM bandwidth."),
  }
  print(f"memcpy: {memcpy['copy_GBps']:.1f} GB/s copied ({memcpy['read_plus_write_GBps']:.1f} GB/s read+write); "
        f"cpu FFI: {ffi_message}")
  configs = []
  for m, d, b, bag, dtype in (QUICK if args.quick else FULL):
    res = bench_config(m, d, b, bag, dtype, rounds, ops, torch)
    print_config(res, memcpy)
    configs.append(res)
  meta["machine"]["load_average_end"] = os.getloadavg()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"meta": meta, "configs": configs}, indent=1))
  print(f"\nwrote {out}")


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  run_command(main)
