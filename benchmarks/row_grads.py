"""CPU benchmark of ``embedding_bag_row_grads`` (the row-sparse value gradient) per backend.

Run by hand (never from tests):

  .venv/bin/python benchmarks/row_grads.py             # N = 3 readers x 2048 tokens x 64 lookups, 9 rounds

The shape is the knowledge sweep's value update: 3 memory layers reading one shared table, 2048
tokens each, 2 heads x top-32 = 64 lookups per token (N = 393,216), value_dim 64, 65,536 slots; the
indices are uniform over the slots. Backends: ``xla`` (jnp.argsort + segment sum), ``xla_loop``
(lax.sort of the lookups + sorted segment sum) and ``cpu`` (the C++ radix-sort kernel
``MemjaxBagRowGrads``), in alternation within one process; medians and minima over rounds. All
three must return the same rows and (to fp32 rounding) the same gradients. Results go to
benchmarks/results/row_grads.json.
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

from memjax.command import ArgumentParser, run_command
from memjax.kernels import cpu as cpu_backend
from memjax.kernels.embedding_bag import embedding_bag_row_grads

BACKENDS = ("cpu", "xla_loop", "xla")


def main(argv=None):
  parser = ArgumentParser(prog="benchmarks/row_grads.py", description=__doc__.split("\n")[0])
  parser.add_argument("--bags", type=int, default=3 * 2048, help="readers x tokens")
  parser.add_argument("--bag-size", type=int, default=64, help="lookups per bag (heads x k)")
  parser.add_argument("--value-dim", type=int, default=64)
  parser.add_argument("--num-slots", type=int, default=65536)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "row_grads.json"))
  args = parser.parse_args(argv)
  b, bag, d, m = args.bags, args.bag_size, args.value_dim, args.num_slots
  rng = np.random.default_rng(0)
  idx = jnp.asarray(rng.integers(0, m, (b, bag), dtype=np.int32))
  w = jnp.asarray(rng.random((b, bag), dtype=np.float32))
  dout = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
  fns = {be: jax.jit(lambda i, ww, g, be=be: embedding_bag_row_grads(i, ww, g, m, backend=be)) for be in BACKENDS}
  outs = {be: jax.block_until_ready(f(idx, w, dout)) for be, f in fns.items()}  # compile, warm up
  agree = {be: bool(np.array_equal(outs[be][0], outs["xla"][0]))
           and bool(np.allclose(outs[be][1], outs["xla"][1], rtol=1e-5, atol=1e-5)) for be in BACKENDS}
  times = {be: [] for be in BACKENDS}
  for r in range(args.rounds):
    for be in BACKENDS[r % 3:] + BACKENDS[: r % 3]:
      t = time.perf_counter()
      jax.block_until_ready(fns[be](idx, w, dout))
      times[be].append(time.perf_counter() - t)
  res = {be: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "agrees_with_xla": agree[be]}
         for be, ts in times.items()}
  print(f"N={b * bag} lookups, Dv={d}, num_slots={m}, {args.rounds} rounds; "
        f"distinct rows: {int(np.sum(np.asarray(outs['cpu'][0]) < m))}")
  print(f"  {'backend':<10}{'median ms':>10}{'min ms':>9}{'vs cpu':>8}  agrees")
  for be, e in res.items():
    print(f"  {be:<10}{e['median_ms']:>10.1f}{e['min_ms']:>9.1f}{e['median_ms'] / res['cpu']['median_ms']:>7.1f}x"
          f"  {e['agrees_with_xla']}")
  payload = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
             "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "load_average_at_end": os.getloadavg(), "jax": jax.__version__,
                         "kernel": cpu_backend.ffi_status()[1]},
             "lookups": b * bag, "value_dim": d, "num_slots": m, "rounds": args.rounds, "backends": res}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  run_command(main)
