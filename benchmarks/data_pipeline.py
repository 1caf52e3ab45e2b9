"""Tokens per second of the memjax input pipeline (read + tokenize + chunk + pack + batch).

Reads the prepared TFDS knowledge base (built first if needed) through
``memjax.data.batch_dataset``, with the byte and the BPE tokenizer, at several batch shapes. For each
shape: a fresh iterator, ``--warmup`` batches, then ``--repeats`` timings of ``--batches`` batches;
the table shows medians. ``tokens/s`` counts all ``B*T`` positions; ``real tok/s`` only those in the
loss (``loss_mask == 1``); ``x consumer`` is ``tokens/s / --consumer_tokens_per_s`` (the rate a small
training run eats; the target is >= 10x).

  python benchmarks/data_pipeline.py                      # table + benchmarks/results/data_pipeline.json
  python benchmarks/data_pipeline.py --shapes 16x256 --tokenizers byte --repeats 3
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from memjax.command import ArgumentParser, run_command
from memjax.config import DataConfig
from memjax.data import batch_dataset, prepare_knowledge
from memjax.data.pipeline import TextSource, tokenizer_for


def parse_args(argv=None):
  p = ArgumentParser(prog="benchmarks/data_pipeline.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--kb", default="small", help="knowledge-base size to read")
  p.add_argument("--data_dir", default=None, help="prepared data (default: a fresh temporary directory)")
  p.add_argument("--tokenizers", default="byte,bpe")
  p.add_argument("--bpe_vocab_size", type=int, default=1024)
  p.add_argument("--shapes", default="16x256,8x128,32x512", help="comma-separated BxT")
  p.add_argument("--batches", type=int, default=40, help="batches per timing")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--read_threads", type=int, default=0)
  p.add_argument("--consumer_tokens_per_s", type=float, default=20_000.0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                               "data_pipeline.json"))
  return p.parse_args(argv)


def measure(source, tokenizer, *, batch_size, seq_len, batches, repeats, warmup, read_threads):
  it = iter(batch_dataset(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0,
                          process_index=0, process_count=1, read_threads=read_threads))
  for _ in range(warmup):
    next(it)
  rates, real_rates, fills = [], [], []
  for _ in range(repeats):
    real = 0.0
    start = time.perf_counter()
    for _ in range(batches):
      real += float(next(it)["loss_mask"].sum())
    seconds = time.perf_counter() - start
    rates.append(batches * batch_size * seq_len / seconds)
    real_rates.append(real / seconds)
    fills.append(real / (batches * batch_size * seq_len))
  return {"tokens_per_s": statistics.median(rates), "real_tokens_per_s": statistics.median(real_rates),
          "fill": statistics.median(fills), "tokens_per_s_all": rates}


def main(argv=None):
  args = parse_args(argv)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="memjax_bench_")
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  builder = prepare_knowledge(data_dir, args.kb)
  prepare_s = time.perf_counter() - t0
  source = TextSource(builder, "train")  # what make_pipeline reads
  rows = []
  for kind in args.tokenizers.split(","):
    t0 = time.perf_counter()
    tok, _ = tokenizer_for(DataConfig(kb=args.kb, tokenizer=kind, bpe_vocab_size=args.bpe_vocab_size,
                                      data_dir=data_dir), builder)
    tok_s = time.perf_counter() - t0
    for shape in args.shapes.split(","):
      b, t = map(int, shape.lower().split("x"))
      r = measure(source, tok, batch_size=b, seq_len=t, batches=args.batches, repeats=args.repeats,
                  warmup=args.warmup, read_threads=args.read_threads)
      r.update(tokenizer=kind, vocab_size=tok.vocab_size, batch_size=b, seq_len=t, tokenizer_setup_s=tok_s,
               x_consumer=r["tokens_per_s"] / args.consumer_tokens_per_s)
      rows.append(r)

  print(f"memjax data pipeline, kb={args.kb} ({len(source)} train documents, prepared in {prepare_s:.2f} s), "
        f"median of {args.repeats} x {args.batches} batches, consumer {args.consumer_tokens_per_s:,.0f} tok/s")
  print(f"{'tokenizer':>9} {'V':>5} {'B':>4} {'T':>5} {'tokens/s':>11} {'real tok/s':>11} {'fill':>5} "
        f"{'x consumer':>10}")
  for r in rows:
    print(f"{r['tokenizer']:>9} {r['vocab_size']:>5} {r['batch_size']:>4} {r['seq_len']:>5} "
          f"{r['tokens_per_s']:>11,.0f} {r['real_tokens_per_s']:>11,.0f} {r['fill']:>5.2f} {r['x_consumer']:>10.1f}")

  import grain
  import sentencepiece
  import tensorflow_datasets as tfds

  result = {
      "benchmark": "data_pipeline",
      "command": " ".join(["python benchmarks/data_pipeline.py", *(sys.argv[1:] if argv is None else argv)]),
      "args": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
      "consumer_tokens_per_s": args.consumer_tokens_per_s,
      "kb_prepare_s": prepare_s,
      "train_documents": len(source),
      "rows": rows,
      "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                  "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]},
      "versions": {"grain": grain.__version__, "tensorflow_datasets": tfds.__version__,
                   "sentencepiece": sentencepiece.__version__},
  }
  if args.data_dir is None:
    shutil.rmtree(data_dir, ignore_errors=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  run_command(main)
