"""Memory size, cost and key usage: the paper's Figure 1 and its cost claims, at laptop scale.

  python benchmarks/scaling.py --preset=smoke            # <= 5 min on 2 cores
  python benchmarks/scaling.py --preset=full             # the published figures
  python benchmarks/scaling.py --preset=full --parts=cost

Three parts (``--parts``, default all), on the base model and the ``memory`` layer (4 heads of
32-wide keys, top-16; not the sweep's ``knowledge_layer`` change) of ``knowledge.py``'s preset of
the same name, as three shared Memory+ layers (training runs: 400 steps in "full", 30 in "smoke"):

  size   Memory+ with 64^2 ... 1024^2 slots (4k -> 1M), everything else fixed, trained with
         ``train.py`` on the same tokens: QA exact match and the training step time.
  cost   in one process, steps of every model interleaved (A, B, C, A, B, C, ...) so that a noisy
         machine slows them alike: step time against slots for the row-sparse and the dense value
         update, and the dense FFN model (knowledge.py's dense_1x) of at least Memory+'s FLOPs.
  usage  Memory+ with and without ``qk_norm``: key usage (``used``: fraction of slots that any
         validation lookup touched; ``kl``: KL divergence of the slot-weight distribution from
         uniform; ``gini``) on the validation batches, 8 times during training.

Writes ``benchmarks/results/scaling_<preset>.json`` and ``.png``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import _runs  # benchmarks/ is the script's directory, first on sys.path
import knowledge
from memjax.command import ArgumentParser, run_command

SIZES = {"smoke": (64, 128, 256), "full": (64, 128, 256, 512, 1024)}
COST_SIZES = {"smoke": (64, 256), "full": (64, 256, 1024)}
STEPS = {"smoke": 30, "full": 400}  # training steps of the size and usage runs


def _memory_plus(preset: dict) -> dict:
  base = {**knowledge.COMMON, **preset["base"], "train.steps": preset["steps"]}
  return {**base, **preset["memory"], "model.memory.layers": "centered:3", "model.memory.swilu": True,
          "model.memory.shared": True}


def _batch(b: int, t: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def time_steps(models: dict[str, dict], vocab: int, repeats: int) -> dict[str, list[float]]:
  """Seconds per jitted train step of each model, measured interleaved after one compile step each."""
  import jax

  from memjax.train.step import make_step_fns
  runners = {}
  for name, overrides in models.items():
    cfg = _runs.typed_config(overrides, vocab)
    fns = make_step_fns(cfg.model, cfg.train)
    step = jax.jit(fns.train_step, donate_argnums=0)
    state = jax.jit(fns.init)(0)
    batch = _batch(cfg.train.batch_size, cfg.train.seq_len, vocab)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    runners[name] = [step, state, batch, []]
    print(f"  compiled {name}", flush=True)
  for _ in range(repeats):
    for name, r in runners.items():
      t0 = time.perf_counter()
      r[1], m = r[0](r[1], r[2])
      jax.block_until_ready(m)
      r[3].append(time.perf_counter() - t0)
  return {name: r[3] for name, r in runners.items()}


def part_size(preset: dict, sizes, vocab: int, root: str, jobs: int) -> list[dict]:
  mp = _memory_plus(preset)
  runs = [_runs.Run(f"size_n{n}", {**mp, "model.memory.n_keys": n}, group=str(n)) for n in sizes]
  results = _runs.run_all(runs, root, jobs=jobs)
  rows = []
  batch_tokens = mp.get("train.batch_size", 16) * mp.get("train.seq_len", 128)
  for run in runs:
    r = results[run.name]
    n = run.overrides["model.memory.n_keys"]
    rows.append({"n_keys": n, "slots": n * n, **_runs.model_figures(run.overrides, vocab),
                 "qa_exact_match": r["final"].get("qa_exact_match"), "val_loss": r["final"].get("val_loss"),
                 "tokens_per_s": r["tokens_per_s"], "step_s": batch_tokens / r["tokens_per_s"],
                 "wall_s": r["wall_s"]})
  print(f"\n{'slots':>10} {'params':>9} {'QA EM':>6} {'val loss':>8} {'step ms':>8}")
  for r in rows:
    print(f"{r['slots']:>10,} {r['params_total'] / 1e6:>8.2f}M {r['qa_exact_match']:>6.3f} {r['val_loss']:>8.3f} "
          f"{r['step_s'] * 1e3:>8.1f}")
  return rows


def part_cost(preset: dict, sizes, vocab: int, repeats: int) -> dict:
  mp = _memory_plus(preset)
  dense = {**knowledge.COMMON, **preset["base"], "train.steps": preset["steps"]}
  models = {"dense_ffn": dense}
  for update in ("sparse", "dense"):
    for n in sizes:
      models[f"{update}_n{n}"] = {**mp, "model.memory.n_keys": n, "model.memory.value_update": update}
  times = time_steps(models, vocab, repeats)
  ref = float(np.median(times["dense_ffn"]))
  rows = []
  for name, ts in times.items():
    o = models[name]
    med = float(np.median(ts))
    rows.append({"model": name, "value_update": None if name == "dense_ffn" else o["model.memory.value_update"],
                 "slots": None if name == "dense_ffn" else o["model.memory.n_keys"] ** 2,
                 "flops_per_token": _runs.model_figures(o, vocab)["flops_per_token"],
                 "median_s": med, "x_dense_ffn": med / ref, "times_s": ts})
  print(f"\n{'model':>14} {'slots':>10} {'FLOPs/tok':>10} {'step ms':>8} {'x dense FFN':>11}")
  for r in rows:
    print(f"{r['model']:>14} {(r['slots'] or 0):>10,} {r['flops_per_token'] / 1e6:>9.2f}M {r['median_s'] * 1e3:>8.1f} "
          f"{r['x_dense_ffn']:>11.2f}")
  return {"repeats": repeats, "rows": rows}


def part_usage(preset: dict, vocab: int, root: str, jobs: int) -> list[dict]:
  mp = _memory_plus(preset)
  every = max(preset["steps"] // 8, 1)
  # Evaluations here measure usage on the validation batches only (no QA decoding: it is slow).
  runs = [_runs.Run(f"usage_qk{int(q)}", {**mp, "model.memory.qk_norm": q, "train.eval_every": every,
                                          "eval.qa_from_kb": False}, group=f"qk_norm={q}") for q in (True, False)]
  results = _runs.run_all(runs, root, jobs=jobs)
  rows = []
  for run in runs:
    evals = results[run.name]["evals"]
    rows.append({"qk_norm": run.overrides["model.memory.qk_norm"],
                 "steps": [int(e["step"]) for e in evals], "used": [e.get("used") for e in evals],
                 "kl": [e.get("kl") for e in evals], "gini": [e.get("gini") for e in evals],
                 "val_loss": [e.get("val_loss") for e in evals]})
  print(f"\n{'qk_norm':>8} {'step':>6} {'used':>6} {'kl':>6} {'gini':>6} {'val loss':>8}")
  for r in rows:
    for i, s in enumerate(r["steps"]):
      print(f"{str(r['qk_norm']):>8} {s:>6} {r['used'][i]:>6.3f} {r['kl'][i]:>6.3f} {r['gini'][i]:>6.3f} "
            f"{r['val_loss'][i]:>8.3f}")
  return rows


def plot(payload: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  size, cost, usage = payload.get("size"), payload.get("cost"), payload.get("usage")
  if size:
    ax = axes[0]
    ax.plot([r["slots"] for r in size], [r["qa_exact_match"] for r in size], "o-", color="C3", label="QA exact match")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory slots")
    ax.set_ylabel("QA exact match")
    tw = ax.twinx()
    tw.plot([r["slots"] for r in size], [r["step_s"] * 1e3 for r in size], "s--", color="C7", label="step time")
    tw.set_ylabel("training step (ms, one core)")
    ax.set_title("Memory+ size (fixed base)", fontsize=10)
    ax.grid(alpha=0.3)
  if cost:
    ax = axes[1]
    rows = cost["rows"]
    for update, color in (("sparse", "C3"), ("dense", "C1")):
      rs = [r for r in rows if r["value_update"] == update]
      ax.plot([r["slots"] for r in rs], [r["median_s"] * 1e3 for r in rs], "o-", color=color, label=f"{update} update")
    ref = next(r for r in rows if r["model"] == "dense_ffn")
    ax.axhline(ref["median_s"] * 1e3, color="C0", ls=":", label="dense FFN model (dense_1x)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory slots")
    ax.set_ylabel("training step (ms, median)")
    ax.set_title("Cost against slots", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  if usage:
    ax = axes[2]
    for r, color in zip(usage, ("C3", "C7")):
      ax.plot(r["steps"], r["used"], "o-", color=color, label=f"used, qk_norm={r['qk_norm']}")
      ax.plot(r["steps"], r["kl"], "s--", color=color, label=f"kl, qk_norm={r['qk_norm']}")
    ax.set_xlabel("training step")
    ax.set_title("Key usage over training", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  _runs.save_figure(fig, path, dpi=110)


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/scaling.py", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smoke", choices=sorted(knowledge.PRESETS))
  p.add_argument("--parts", default="size,cost,usage")
  p.add_argument("--steps", type=int, default=0, help="training steps of 'size' and 'usage' (0 = preset's)")
  p.add_argument("--sizes", default="", help="n_keys of 'size', comma-separated (default: preset's)")
  p.add_argument("--cost_sizes", default="", help="n_keys of 'cost', comma-separated (default: preset's)")
  p.add_argument("--repeats", type=int, default=0, help="timed steps per model in 'cost' (0 = preset's)")
  p.add_argument("--jobs", type=int, default=2)
  p.add_argument("--root", default="")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  unknown = sorted(set(parts) - {"size", "cost", "usage"})
  if unknown:
    p.error(f"--parts: unknown {unknown}; choose from size, cost, usage")
  preset = dict(knowledge.PRESETS[args.preset])
  preset["steps"] = args.steps or STEPS[args.preset]
  sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else SIZES[args.preset]
  cost_sizes = [int(x) for x in args.cost_sizes.split(",")] if args.cost_sizes else COST_SIZES[args.preset]
  root = args.root or os.path.join(_runs.REPO, "runs", f"bench_scaling_{args.preset}")
  out = args.out or os.path.join(_runs.REPO, "benchmarks", "results", f"scaling_{args.preset}.json")
  t0 = time.time()
  vocab = _runs.prepare_data({**knowledge.COMMON, **preset["base"]})
  payload = {"command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "machine": _runs.machine(), "preset": args.preset, "preset_config": preset, "vocab_size": vocab}
  if "size" in parts:
    payload["size"] = part_size(preset, sizes, vocab, root, args.jobs)
  if "usage" in parts:
    payload["usage"] = part_usage(preset, vocab, root, args.jobs)
  if "cost" in parts:
    payload["cost"] = part_cost(preset, cost_sizes, vocab, args.repeats or (3 if args.preset == "smoke" else 7))
  payload["wall_s_total"] = time.time() - t0
  _runs.write_json(out, payload)
  plot(payload, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
  run_command(main)
