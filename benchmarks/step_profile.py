"""Where a Memory+ train step's time goes, and what it costs against dense steps of equal and 2x FLOPs.

  python benchmarks/step_profile.py                          # the three model families below
  python benchmarks/step_profile.py --families=knowledge --repeats=5
  python benchmarks/step_profile.py --topk_backend=xla       # the same with XLA's top-k (the old path)
  python benchmarks/step_profile.py --xla_update             # + Memory+ rows with train.fused_value_update=False

Families (each: dense 1x, dense 2x FLOPs, Memory+ with the dense and with the sparse value update):
  knowledge  benchmarks/knowledge.py's "full" models: width 64, 4 blocks, 3 Memory+ layers over
             256^2 = 65k slots, 2 heads of 64-wide keys, top-32; batch 16 x 128
  paper_cpu  the default trunk (width 128, 4 blocks) with one paper-shaped Memory+ layer: n 1024
             (1M slots), 4 heads of 64-wide keys, top-32, value width 128; batch 16 x 128 (262k
             lookups a step: a quarter of the rows read, so the dense update's whole-table pass dominates)
  paper_cpu_16k  the same models at batch 128 x 128 = 16,384 tokens (2.1M lookups a step, each row
             read ~2 times): closer to the paper's regime, where a step reads every row many times
             (e.g. 1M tokens x 128 lookups over 1M slots) and the table's update is amortised
  default    configs/default.py's model (width 128, one Memory+ layer over 4k slots)
The dense models are searched in width and depth for the FLOPs/token closest to 1x and 2x the
Memory+ model's (knowledge.dense_scaled).

All steps of a family are compiled first, then run interleaved (A, B, C, D, A, B, ...) so that a
noisy shared machine slows them alike; the table gives medians, their ratio to dense 1x, and the
median over rounds of each round's own ratio (robust to slow drifts of the machine). Then, for one
memory layer of each family at the step's shapes (tokens = batch x seq), the parts of the read, timed
the same way, as prefixes whose differences are the parts:
  scoring      query -> the two halves' sub-key scores (two matmuls)
  top-k        + the selection (memjax.kernels.topk: the C++ kernel on CPU)
  read fwd     + softmax + embedding_bag (the whole memory_read)
  read fwd+bwd the read and its gradients (query, keys, values)
and, for the layer's value pool, the value update at the step's shapes (all readers' lookups), dense
and lazy: the fused CPU kernels (memjax_value_row_sums + memjax_value_adam) that the step runs.
Writes ``benchmarks/results/step_profile.json``. Uses a 1,024-token vocabulary (the BPE size of the
knowledge sweep) rather than training a tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs  # noqa: E402
import knowledge  # noqa: E402

from memjax.command import ArgumentParser, run_command  # noqa: E402
from memjax.memory.product_keys import product_key_topk, subkey_scores_head_major  # noqa: E402
from memjax.memory.read import memory_read  # noqa: E402
from memjax.train.step import make_step_fns  # noqa: E402

VOCAB = 1024
FAMILIES = ("knowledge", "paper_cpu", "paper_cpu_16k", "default")


# Each family: the trunk (overrides of configs/base.py) and its Memory+ layers. Its dense models are
# searched (knowledge.dense_scaled: width and depth) for the FLOPs/token closest to 1x and 2x Memory+'s.
_KNOWLEDGE_TRUNK = {k: v for k, v in knowledge.PRESETS["full"]["base"].items() if k.startswith("model.")}
_DEFAULT_TRUNK = {"model.dim": 128, "model.num_layers": 4, "model.mlp_dim": 512, "model.num_heads": 4,
                  "model.head_dim": 32}
_MEMORY_PLUS = {"model.memory.swilu": True, "model.memory.shared": True}
FAMILY_MODELS = {
    "knowledge": (_KNOWLEDGE_TRUNK, {**knowledge.COMMON, **knowledge.PRESETS["full"]["memory"],
                                     **knowledge.PRESETS["full"]["knowledge_layer"], **_MEMORY_PLUS,
                                     "model.memory.layers": "centered:3"}),
    "paper_cpu": (_DEFAULT_TRUNK, {**_MEMORY_PLUS, "model.memory.layers": "centered:1", "model.memory.n_keys": 1024,
                                   "model.memory.heads": 4, "model.memory.k": 32, "model.memory.key_dim": 64,
                                   "model.memory.value_dim": 128, "model.memory.qk_norm": True}),
    "default": (_DEFAULT_TRUNK, {**_MEMORY_PLUS, "model.memory.layers": "centered:1"}),  # configs/default.py's
}
FAMILY_MODELS["paper_cpu_16k"] = ({**_DEFAULT_TRUNK, "train.batch_size": 128}, FAMILY_MODELS["paper_cpu"][1])


def family_configs(family: str, xla_update: bool = False) -> dict:
  """{name: typed Config}: dense_1x, dense_2x (FLOPs-matched to 1x / 2x Memory+), memory_plus_{dense,sparse}
  (and with ``xla_update`` memory_plus_{dense,sparse}_xla_update: ``train.fused_value_update=False``)."""
  trunk, memory = FAMILY_MODELS[family]
  base_flops = _runs.model_figures(trunk, VOCAB)["flops_per_token"]
  mp_flops = _runs.model_figures({**trunk, **memory}, VOCAB)["flops_per_token"]
  out = {f"dense_{m}x": {**trunk, **knowledge.dense_scaled(trunk, m * mp_flops / base_flops, VOCAB)} for m in (1, 2)}
  for update in ("dense", "sparse"):
    out[f"memory_plus_{update}"] = {**trunk, **memory, "model.memory.value_update": update}
  if xla_update:
    for update in ("dense", "sparse"):
      out[f"memory_plus_{update}_xla_update"] = {**out[f"memory_plus_{update}"], "train.fused_value_update": False}
  return {k: _runs.typed_config(v, VOCAB) for k, v in out.items()}


def _batch(b, t, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, VOCAB, (b, t + 1)).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def interleaved(runners: dict, repeats: int) -> dict[str, list[float]]:
  """{name: [seconds]}: each runner is a zero-argument callable that blocks until done."""
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return times


def step_runners(configs: dict, topk_backend: str) -> dict:
  runners = {}
  for name, cfg in configs.items():
    if topk_backend != "auto":
      mem = cfg.model.memory
      mem = dataclasses.replace(mem, layer=dataclasses.replace(mem.layer, topk=topk_backend))
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory=mem))
    fns = make_step_fns(cfg.model, cfg.train)
    step = jax.jit(fns.train_step, donate_argnums=0)
    box = [jax.jit(fns.init)(0)]
    batch = _batch(cfg.train.batch_size, cfg.train.seq_len)

    def run(step=step, box=box, batch=batch):
      box[0], m = step(box[0], batch)
      jax.block_until_ready(m)

    run()  # compile
    runners[name] = run
    print(f"  compiled {name}", flush=True)
  return runners


def read_runners(cfg, topk_backend: str) -> dict:
  """Prefixes of one memory layer's read at the step's shapes (see the module docstring)."""
  layer = cfg.model.memory.layer
  tokens = cfg.train.batch_size * cfg.train.seq_len
  n, h, k, dk, dv = layer.n_keys, layer.heads, layer.k, layer.key_dim, layer.value_dim
  r = np.random.default_rng(0)
  q = jnp.asarray(r.standard_normal((tokens, h, dk)), jnp.float32)
  keys = jnp.asarray(r.standard_normal((h, 2, n, dk // 2)), jnp.float32)
  values = jnp.asarray(r.standard_normal((n * n, dv)) * 0.02, jnp.float32)
  d_out = jnp.asarray(r.standard_normal((tokens, dv)), jnp.float32)
  bag = "xla" if cfg.model.memory.row_sparse else "auto"

  def loss(q, keys, values):
    return jnp.vdot(memory_read(q, keys, values, k=k, backend=bag, topk=topk_backend).out, d_out)

  fns = {
      "scoring": jax.jit(lambda q, keys, v: subkey_scores_head_major(q, keys)),
      "top-k": jax.jit(lambda q, keys, v: product_key_topk(q, keys, k, backend=topk_backend)),
      "read fwd": jax.jit(lambda q, keys, v: memory_read(q, keys, v, k=k, backend=bag, topk=topk_backend).out),
      "read fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
  }
  runners = {}
  for name, f in fns.items():
    jax.block_until_ready(f(q, keys, values))
    runners[name] = lambda f=f: jax.block_until_ready(f(q, keys, values))
  return runners


def update_runners(cfg) -> dict:
  """The fused value update of the pool (``optim``'s CPU kernels) at the step's shapes: its readers'
  lookups and read cotangents, then Adam, dense (every row) and lazy (rows read)."""
  from memjax.kernels import cpu

  layer = cfg.model.memory.layer
  readers = len(cfg.model.memory.layers) if cfg.model.memory.shared else 1
  b, t, lk, m, dv = cfg.train.batch_size, cfg.train.seq_len, layer.heads * layer.k, layer.num_slots, layer.value_dim
  r = np.random.default_rng(0)
  idx = jnp.asarray(r.integers(0, m, (readers, b, t, lk)), jnp.int32)
  w = jnp.asarray(r.random((readers, b, t, lk)), jnp.float32)
  dy = jnp.asarray(r.standard_normal((readers, b, t, dv)), jnp.float32)
  table, mu, nu = (jnp.asarray(r.standard_normal((m, dv)), jnp.float32) for _ in range(3))
  nu = jnp.abs(nu)

  def update(lazy):  # as in the step: the table and moments donated, in place where the step does so
    def fn(state, idx, w, dy):
      table, mu, nu = state
      rows, g, _ = cpu.value_row_sums(idx, w, dy, m)
      return cpu.value_adam(table, mu, nu, rows, g, lr=1e-3, div=1.0, mul=1.0, bc1=0.1, bc2=0.05, b1=0.9, b2=0.95,
                            eps=1e-8, weight_decay=0.0, lazy=lazy, table_in_place=lazy and idx.size < m)
    f = jax.jit(fn, donate_argnums=0)
    box = [f(tuple(jnp.array(x, copy=True) for x in (table, mu, nu)), idx, w, dy)]
    jax.block_until_ready(box[0])

    def run():
      box[0] = f(box[0], idx, w, dy)
      jax.block_until_ready(box[0])
    return run

  sums = jax.jit(lambda idx, w, dy: cpu.value_row_sums(idx, w, dy, m))
  jax.block_until_ready(sums(idx, w, dy))
  return {"row sums": lambda: jax.block_until_ready(sums(idx, w, dy)), "dense update": update(False),
          "lazy update": update(True)}


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/step_profile.py", description=__doc__.splitlines()[0])
  p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--topk_backend", default="auto", choices=["auto", "xla", "approx"],
                 help="model.memory.topk of every memory model (xla: the path before the C++ kernel)")
  p.add_argument("--xla_update", action="store_true",
                 help="also time the Memory+ steps with train.fused_value_update=False (XLA's update)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_profile.json"))
  args = p.parse_args(argv)
  families = [f for f in args.families.split(",") if f]
  for f in families:
    if f not in FAMILIES:
      p.error(f"--families: unknown family {f!r}; allowed: {list(FAMILIES)}")
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  results = []
  for family in families:
    print(f"{family}:", flush=True)
    configs = family_configs(family, args.xla_update)
    times = interleaved(step_runners(configs, args.topk_backend), args.repeats)
    base = float(np.median(times["dense_1x"]))
    steps = {name: {"median_ms": 1e3 * float(np.median(t)), "over_dense_1x": float(np.median(t)) / base,
                    "round_ratio_median": float(np.median(np.asarray(t) / np.asarray(times["dense_1x"]))),
                    "flops_per_token": configs[name].model.flops_per_token(configs[name].train.seq_len),
                    "times_s": t} for name, t in times.items()}
    parts = interleaved(read_runners(configs["memory_plus_dense"], args.topk_backend), args.repeats)
    med = {name: 1e3 * float(np.median(t)) for name, t in parts.items()}
    readers = len(configs["memory_plus_dense"].model.memory.layers)
    upd = {name: 1e3 * float(np.median(t))
           for name, t in interleaved(update_runners(configs["memory_plus_dense"]), args.repeats).items()}
    results.append({"family": family, "steps": steps, "read_prefix_ms": med, "memory_layers": readers,
                    "read_parts_ms": {"scoring": med["scoring"], "top-k": med["top-k"] - med["scoring"],
                                      "softmax + bag": med["read fwd"] - med["top-k"],
                                      "backward": med["read fwd+bwd"] - med["read fwd"]},
                    "value_update_ms": upd})
  print(f"\n{'family':<13} {'step':<32} {'GFLOP/tok':>9} {'median ms':>10} {'x dense 1x':>10} {'round x':>8}")
  for r in results:
    for name, s in r["steps"].items():
      print(f"{r['family']:<13} {name:<32} {s['flops_per_token'] / 1e9:>9.4f} {s['median_ms']:>10.1f} "
            f"{s['over_dense_1x']:>10.2f} {s['round_ratio_median']:>8.2f}")
  print("\none memory layer's read at the step's shapes (ms; a Memory+ step has 'layers' of them):")
  print(f"{'family':<13} {'scoring':>8} {'top-k':>8} {'soft+bag':>9} {'backward':>9} {'total':>8} {'layers':>7}")
  for r in results:
    parts = r["read_parts_ms"]
    print(f"{r['family']:<13} {parts['scoring']:>8.1f} {parts['top-k']:>8.1f} {parts['softmax + bag']:>9.1f} "
          f"{parts['backward']:>9.1f} {r['read_prefix_ms']['read fwd+bwd']:>8.1f} {r['memory_layers']:>7}")
  print("\nthe pool's value update at the step's shapes (ms; once per step, all readers' lookups):")
  print(f"{'family':<13} {'row sums':>9} {'dense update':>13} {'lazy update':>12}")
  for r in results:
    u = r["value_update_ms"]
    print(f"{r['family']:<13} {u['row sums']:>9.1f} {u['dense update']:>13.1f} {u['lazy update']:>12.1f}")
  meta = {"command": "python benchmarks/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "machine": _runs.machine(), "jax": jax.__version__, "repeats": args.repeats,
          "topk_backend": args.topk_backend, "xla_update": args.xla_update,
          "load_average_at_end": os.getloadavg()}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  run_command(main)
