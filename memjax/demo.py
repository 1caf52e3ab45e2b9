"""A short tour of one memory layer: build it, look a few tokens up, print slots and usage.

Run: ``python -m memjax.demo`` (add ``--n_keys 256`` etc. to try other sizes).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import MemoryConfig, ProductKeyMemory, memory_usage, product_key_topk_reference
from memjax.command import ArgumentParser, run_command


def main(argv=None) -> None:
  parser = ArgumentParser(prog="python -m memjax.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--n_keys", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--tokens", type=int, default=4096)
  args = parser.parse_args(argv)

  cfg = MemoryConfig(n_keys=args.n_keys, heads=args.heads, k=args.k, key_dim=args.dim, value_dim=args.dim)
  layer = ProductKeyMemory(args.dim, cfg, rngs=nnx.Rngs(0))
  print(f"memory layer: {cfg.num_slots:,} slots x {cfg.value_dim} (value params {cfg.value_params():,}), "
        f"{cfg.heads} heads x top-{cfg.k}, {cfg.flops_per_token(args.dim):,} FLOPs/token, "
        f"{cfg.bytes_read_per_token():,} value bytes read/token")

  x = jax.random.normal(jax.random.key(1), (args.tokens, args.dim))
  read = nnx.jit(lambda m, x: m.read(x))
  jax.block_until_ready(read(layer, x))
  t0 = time.perf_counter()
  r = jax.block_until_ready(read(layer, x))
  dt = time.perf_counter() - t0
  print(f"read {args.tokens} tokens in {dt * 1e3:.1f} ms ({args.tokens / dt:,.0f} tokens/s)")

  for t in range(3):
    print(f"token {t}: head 0 slots {r.indices[t, 0].tolist()}")
    print(f"         weights    {[round(float(w), 3) for w in r.weights[t, 0]]}")

  q, keys = layer.queries(x[:64])
  _, brute = product_key_topk_reference(q, keys, cfg.k)
  same = bool(jnp.all(jnp.sort(brute, -1) == jnp.sort(r.indices[:64], -1)))
  print(f"product-key top-k equals brute force over all {cfg.num_slots:,} slots on 64 tokens: {same}")

  usage = memory_usage(r.indices, r.weights, cfg.num_slots)
  print("usage over the batch: " + ", ".join(f"{k}={float(v):.4g}" for k, v in usage.items()))


if __name__ == "__main__":
  run_command(main)
