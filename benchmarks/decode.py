"""Decoding with the KV cache: the QA probe's speed-up, and decode tokens/s for Memory+ against dense.

  python benchmarks/decode.py --workdir=runs/default         # QA on the trained default run + the table
  python benchmarks/decode.py --skip_qa --batches=1,8 --steps=16

1. QA: ``qa_exact_match`` on the default config's QA setting (``eval.qa_seq_len`` window,
   ``eval.qa_batch_size`` rows, ``eval.qa_max_items`` knowledge-base facts) twice: re-running the window
   for every token (the probe before the cache) and with the KV cache (``greedy_fn``); the predictions
   must be identical; the table gives the wall time of each (median of ``--repeats`` after a warm-up run)
   and the speed-up. Uses ``--workdir``'s checkpoint when it has one, else the default model at init.
2. Decode: for configs/default.py's Memory+ model, the dense model of equal FLOPs (the same blocks with a
   SwiGLU FFN where the memory was) and the dense model of 2x FLOPs (``knowledge.dense_scaled``), at each
   batch size: the per-token latency of one decode step (median over ``--steps`` steps after a
   ``--prompt_len``-token prefill; weights at init: speed does not depend on training) and tokens/s =
   batch / latency; beside them the forward FLOPs per token (the config's formula at the cache length), the
   value-row bytes each token reads (memory layers x heads x k x value_dim x bytes), the other weights'
   bytes (read once per step, so per token / batch) and the KV cache bytes read per token.

Writes ``benchmarks/results/decode.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import default  # noqa: E402
from memjax.command import ArgumentParser, run_command  # noqa: E402
from memjax.config_bridge import config_from_dict  # noqa: E402
from memjax.generation import _prefill_jit, _step_jit  # noqa: E402
from memjax.model import LM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times


def qa_speedup(workdir: str, repeats: int) -> dict:
  from memjax.data.pipeline import prepare_data, tokenizer_for
  from memjax.data.qa import kv_cache_greedy, load_qa_items, qa_exact_match
  trained = os.path.isdir(os.path.join(workdir, "checkpoints"))
  if trained:
    from memjax.generate import load_workdir
    model, cfg, step = load_workdir(workdir)
    source = f"{workdir} step {step}"
  else:
    cfg = config_from_dict(default.get_config())
  tok = tokenizer_for(cfg.data, prepare_data(cfg.data))[0]
  if not trained:
    cfg = cfg.with_vocab(tok.vocab_size)
    model = LM(cfg.model, rngs=nnx.Rngs(0))
    source = "default config at init"
  items = load_qa_items(cfg.data.resolved_data_dir, cfg.data.kb, cfg.data.kb_seed)[:cfg.eval.qa_max_items]
  ev = cfg.eval
  kw = dict(batch_size=ev.qa_batch_size, max_answer_tokens=ev.qa_max_answer_tokens or None,
            seq_len=ev.qa_seq_len or cfg.train.seq_len, return_predictions=True)
  graphdef, state = nnx.split(model)
  logits_jit = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
  logits_fn = lambda t: np.asarray(logits_jit(state, jnp.asarray(t, jnp.int32)))
  greedy_fn = kv_cache_greedy(model, eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = {}
  for name, call in (("window_rerun", lambda: qa_exact_match(logits_fn, items, tok, **kw)),
                     ("kv_cache", lambda: qa_exact_match(None, items, tok, greedy_fn=greedy_fn, **kw))):
    result = call()  # warm-up: compiles
    med, times = _median_time(call, repeats)
    out[name] = {"median_s": med, "times_s": times, "qa_exact_match": result["qa_exact_match"],
                 "predictions": [p["prediction"] for p in result["predictions"]]}
    print(f"QA {name}: {med:.2f} s, exact match {result['qa_exact_match']:.3f}", flush=True)
  same = out["window_rerun"].pop("predictions") == out["kv_cache"].pop("predictions")
  return {"model": source, "trained": trained, "items": len(items), "window": kw["seq_len"],
          "batch_size": kw["batch_size"], "identical_predictions": same, **out,
          "speedup": out["window_rerun"]["median_s"] / out["kv_cache"]["median_s"]}


def decode_models(vocab: int) -> dict:
  """{name: ModelConfig}: default Memory+, dense of equal FLOPs, dense of 2x FLOPs."""
  import knowledge
  c = default.get_config()
  mp = config_from_dict(c).with_vocab(vocab)
  c.model.memory.layers = ""
  dense = config_from_dict(c).with_vocab(vocab)
  base = {"model.dim": dense.model.dim, "model.mlp_dim": dense.model.mlp_dim,
          "model.num_heads": dense.model.num_heads, "model.num_layers": dense.model.num_layers,
          "model.head_dim": dense.model.head_dim}
  for key, value in knowledge.dense_scaled(base, 2, vocab).items():
    c.model[key.split(".", 1)[1]] = value
  dense2 = config_from_dict(c).with_vocab(vocab)
  return {"memory_plus": mp, "dense_1x": dense, "dense_2x": dense2}


def decode_table(batches, steps: int, prompt_len: int, vocab: int) -> list[dict]:
  rows = []
  for name, cfg in decode_models(vocab).items():
    m = cfg.model
    model = LM(m, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    mem = m.memory.layer
    n_mem = len(m.memory.layers)
    value_bytes = n_mem * mem.heads * mem.k * mem.value_dim * jnp.dtype(mem.jnp_value_dtype).itemsize
    counts = m.param_counts()
    weight_bytes = (counts["total"] - counts["values"]) * 4
    cache_len = prompt_len + steps
    for b in batches:
      tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (b, prompt_len)), jnp.int32)
      lengths = jnp.full((b,), prompt_len, jnp.int32)
      logits, cache = _prefill_jit(graphdef, state, tokens, lengths, cache_len=cache_len)
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      logits, cache = _step_jit(graphdef, state, token, lengths, cache)  # compile
      jax.block_until_ready(logits)
      times = []
      for i in range(1, steps):
        t0 = time.perf_counter()
        logits, cache = _step_jit(graphdef, state, token, lengths + i, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
      lat = float(np.median(times))
      kv_bytes = m.num_layers * 2 * (prompt_len + steps // 2) * m.num_heads * m.head_dim * 4
      rows.append({"model": name, "batch": b, "latency_ms": lat * 1e3, "tokens_per_s": b / lat,
                   "flops_per_token": m.flops_per_token(cache_len), "params_total": counts["total"],
                   "value_bytes_per_token": value_bytes, "weight_bytes_per_token": weight_bytes / b,
                   "kv_bytes_per_token": kv_bytes, "times_s": times})
      print(f"{name} batch {b}: {lat * 1e3:.2f} ms/token step, {b / lat:,.0f} tokens/s", flush=True)
  return rows


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/decode.py", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/default", help="a trained default run for the QA figure")
  p.add_argument("--batches", default="1,8,64")
  p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3, help="QA runs timed per method")
  p.add_argument("--skip_qa", action="store_true")
  p.add_argument("--out", default=os.path.join(HERE, "results", "decode.json"))
  args = p.parse_args(argv)
  batches = [int(x) for x in args.batches.split(",")]
  qa = None if args.skip_qa else qa_speedup(args.workdir, args.repeats)
  vocab = config_from_dict(default.get_config()).data.bpe_vocab_size
  rows = decode_table(batches, args.steps, args.prompt_len, vocab)
  if qa is not None:
    print(f"\nQA ({qa['items']} facts, window {qa['window']}, batch {qa['batch_size']}, {qa['model']}): "
          f"re-run {qa['window_rerun']['median_s']:.2f} s, KV cache {qa['kv_cache']['median_s']:.2f} s, "
          f"speed-up {qa['speedup']:.1f}x, identical predictions: {qa['identical_predictions']}")
  print(f"\n{'model':>11} {'batch':>5} {'ms/step':>8} {'tokens/s':>9} {'MFLOP/tok':>9} {'value B/tok':>11} "
        f"{'weight B/tok':>12} {'KV B/tok':>9}")
  for r in rows:
    print(f"{r['model']:>11} {r['batch']:>5} {r['latency_ms']:>8.2f} {r['tokens_per_s']:>9,.0f} "
          f"{r['flops_per_token'] / 1e6:>9.2f} {r['value_bytes_per_token']:>11,} "
          f"{r['weight_bytes_per_token']:>12,.0f} {r['kv_bytes_per_token']:>9,}")
  meta = {"command": "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
          "jax": jax.__version__, "load_avg": os.getloadavg()}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "qa": qa, "decode": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_command(main)
