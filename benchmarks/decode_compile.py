"""The generation decode step compiled deviceless for TPU and GPU targets: memory per device by batch.

  python benchmarks/decode_compile.py                       # v5p-8 (table over memory=4), h100-1, h200-1
  python benchmarks/decode_compile.py --batches=1,64 --targets=h100-1

configs/default.py's Memory+ model with a 1M-slot table (``n_keys=1024``) and a 4k KV cache
(``train.seq_len=4096`` as the cache length), one decode step (``python -m memjax.compile --step=decode``,
which runs in the accelerator-compiler venv of ``.ci/aot_env.sh``) at each batch size. Nothing runs on an
accelerator; the numbers are the target compiler's memory analysis (and, on TPU, its cost model's
``optimal_seconds``, an estimate, not a measurement). Writes ``benchmarks/results/decode_compile.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from memjax.command import ArgumentParser, run_command

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MESHES = {"v5p-8": "data=1,memory=4", "h100-1": "data=1,memory=1", "h200-1": "data=1,memory=1"}


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/decode_compile.py", description=__doc__.splitlines()[0])
  p.add_argument("--targets", default="v5p-8,h100-1,h200-1")
  p.add_argument("--batches", default="1,8,64,256")
  p.add_argument("--n_keys", type=int, default=1024)
  p.add_argument("--cache", type=int, default=4096)
  p.add_argument("--out", default=os.path.join(HERE, "results", "decode_compile.json"))
  args = p.parse_args(argv)
  rows = []
  for target in args.targets.split(","):
    for b in [int(x) for x in args.batches.split(",")]:
      cmd = [sys.executable, "-m", "memjax.compile", f"--config={REPO}/configs/default.py", f"--target={target}",
             "--mesh", MESHES.get(target, "data=1,memory=1"), "--step=decode", "--json",
             "--config.model.vocab_size=1024", f"--config.model.memory.n_keys={args.n_keys}",
             f"--config.train.seq_len={args.cache}", f"--config.train.batch_size={b}"]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # another process may hold libtpu
                                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
      if out.returncode != 0:
        print(f"{target} batch {b}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        rows.append({"target": target, "batch_size": b, "error": out.stderr.strip().splitlines()[-1:]})
        continue
      r = json.loads(out.stdout[out.stdout.index("{"):])
      rows.append(r)
      print(f"{target} batch {b}: {r['total_bytes_per_device'] / 2**30:.2f} GiB per device, compiled in "
            f"{r['compile_seconds']} s", flush=True)
  gib = lambda x: f"{x / 2**30:.2f}"
  print(f"\n{'target':>8} {'batch':>5} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>9} {'fits':>5} {'est. ms':>8}")
  for r in rows:
    if "error" in r:
      print(f"{r['target']:>8} {r['batch_size']:>5} failed")
      continue
    m, est = r["bytes_per_device"], r.get("compiler_seconds_estimate")
    print(f"{r['target']:>8} {r['batch_size']:>5} {gib(m['argument']):>9} {gib(m['temp']):>9} "
          f"{gib(r['total_bytes_per_device']):>9} {str(r['fits']):>5} {(f'{est * 1e3:.3f}' if est else '-'):>8}")
  meta = {"command": "python benchmarks/decode_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "model": "configs/default.py, vocab 1024", "n_keys": args.n_keys, "cache": args.cache}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "results": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_command(main)
