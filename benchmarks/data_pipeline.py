"""Tokens per second of the memjax input pipeline (read + tokenize + chunk + pack + batch).

Two tables. **Sources** (``--table sources``): a synthetic corpus (``--docs`` documents of about
``--doc_bytes`` bytes, C4's mean is ~2.2 kB) written as each source kind (a TFDS dataset prepared in a
temporary data dir, ArrayRecord, Parquet, JSONL, and Parquet of pre-tokenized ids), read through
``make_pipeline`` at the paper's 373M shape (``--source_shape``, default 8x2048) with each tokenizer
(byte; a BPE-1024 trained by memjax; a ``tokenizer.json`` BPE built with the ``tokenizers`` package),
in one thread and one process: tokens/s **per core**. Next to it, what one host consumes at
``configs/paper_373m.py``: chips x dense bf16 peak (``memjax/scale/targets.py``) x ``--mfu`` / train
FLOPs per token (3 x ``ModelConfig.flops_per_token``, the planner's count, ``python -m memjax.plan``),
and the cores that would give 2x that rate, assuming the rate scales with ``data.workers`` (one
process per core; not measured here, on a 2-core shared machine).

**Knowledge base** (``--table kb``): reads the prepared TFDS knowledge base (built first if needed) through
``memjax.data.batch_dataset``, with the byte and the BPE tokenizer, at several batch shapes. For each
shape: a fresh iterator, ``--warmup`` batches, then ``--repeats`` timings of ``--batches`` batches;
the table shows medians. ``tokens/s`` counts all ``B*T`` positions; ``real tok/s`` only those in the
loss (``loss_mask == 1``); ``x consumer`` is ``tokens/s / --consumer_tokens_per_s`` (the rate a small
training run eats; the target is >= 10x).

  python benchmarks/data_pipeline.py                      # both tables + benchmarks/results/data_pipeline.json
  python benchmarks/data_pipeline.py --table sources --docs 2000
  python benchmarks/data_pipeline.py --table kb --shapes 16x256 --tokenizers byte --repeats 3
"""

from __future__ import annotations

import itertools
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
  p.add_argument("--table", default="both", choices=["both", "sources", "kb"])
  p.add_argument("--docs", type=int, default=3000, help="documents of the synthetic corpus (sources table)")
  p.add_argument("--doc_bytes", type=int, default=2200, help="mean document size in bytes (sources table)")
  p.add_argument("--source_shape", default="8x2048", help="BxT of the sources table")
  p.add_argument("--source_batches", type=int, default=8,
                 help="batches per timing (sources table; rounded up to whole packing cycles)")
  p.add_argument("--source_kinds", default="tfds,array_record,parquet,jsonl,parquet_ids")
  p.add_argument("--source_tokenizers", default="byte,bpe,hf")
  p.add_argument("--source_workers", default="0",
                 help="comma-separated data.workers values (sources table; 0 = one core, the per-core rate)")
  p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation assumed for the consumers")
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


def kb_table(args):
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

  if args.data_dir is None:
    shutil.rmtree(data_dir, ignore_errors=True)
  return {"consumer_tokens_per_s": args.consumer_tokens_per_s, "kb_prepare_s": prepare_s,
          "train_documents": len(source), "rows": rows, "loadavg_1min_before": load_before}


# ----- the sources table -----------------------------------------------------------------------

def consumers(mfu: float) -> dict:
  """Tokens/s one host eats at configs/paper_373m.py: chips x peak x mfu / train FLOPs per token."""
  from memjax.config_bridge import config_from_dict, load_config_file
  from memjax.scale.targets import get

  cfg = config_from_dict(load_config_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       "configs", "paper_373m.py")))
  train_flops = 3 * cfg.model.flops_per_token(cfg.train.seq_len)
  out = {}
  for label, name in (("v5p-8", "v5p-8"), ("8xH100", "h100-8")):
    t = get(name)
    out[label] = {"chips": t.chips, "peak_flops": t.peak_flops, "train_flops_per_token": train_flops,
                  "tokens_per_s": t.chips * t.peak_flops * mfu / train_flops}
  return out


def synthetic_docs(n: int, mean_bytes: int, seed: int = 0) -> list[str]:
  """Word salad with a Zipf-like vocabulary of 5,000 pseudo-words, lengths ~ exponential around the mean."""
  import numpy as np

  rng = np.random.default_rng(seed)
  syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "or", "el", "is", "um", "pre", "con"]
  words = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(5000)]
  p = 1.0 / np.arange(1, 5001)
  p /= p.sum()
  docs = []
  for _ in range(n):
    k = max(5, int(rng.exponential(mean_bytes / 6.5)))
    text = " ".join(np.asarray(words)[rng.choice(5000, size=k, p=p)])
    docs.append(". ".join(text[i:i + 80].capitalize() for i in range(0, len(text), 80)) + ".")
  return docs


def write_sources(root: str, docs: list[str], ids: list[list[int]], files: int = 8) -> dict:
  import json as json_lib

  import pyarrow as pa
  import pyarrow.parquet as pq
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from tensorflow_datasets.proto import tf_example_pb2

  from memjax.data._tfds import code_path_of, quiet_prepare

  for kind in ("ar", "pq", "pqids", "jl"):
    os.makedirs(os.path.join(root, kind), exist_ok=True)
  per = -(-len(docs) // files)
  for f in range(files):
    part = range(f * per, min(len(docs), (f + 1) * per))
    w = ArrayRecordWriter(os.path.join(root, "ar", f"part-{f}.array_record"), "group_size:1")
    for i in part:
      ex = tf_example_pb2.Example()
      ex.features.feature["text"].bytes_list.value.append(docs[i].encode())
      w.write(ex.SerializeToString())
    w.close()
    pq.write_table(pa.table({"text": [docs[i] for i in part]}), os.path.join(root, "pq", f"part-{f}.parquet"),
                   row_group_size=256)
    pq.write_table(pa.table({"ids": pa.array([ids[i] for i in part], pa.list_(pa.int32()))}),
                   os.path.join(root, "pqids", f"part-{f}.parquet"), row_group_size=256)
    with open(os.path.join(root, "jl", f"part-{f}.jsonl"), "w") as fh:
      fh.writelines(json_lib.dumps({"text": docs[i]}) + "\n" for i in part)

  class MemjaxBenchCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = code_path_of(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, d in enumerate(docs):
        yield i, {"text": d}

  quiet_prepare(MemjaxBenchCorpus(data_dir=os.path.join(root, "data"), file_format="array_record"))
  return {"tfds": "tfds:memjax_bench_corpus", "array_record": f"array_record:{root}/ar/*.array_record",
          "parquet": f"parquet:{root}/pq/*.parquet", "jsonl": f"jsonl:{root}/jl/*.jsonl",
          "parquet_ids": f"parquet:{root}/pqids/*.parquet"}


def hf_tokenizer_json(path: str, docs: list[str], vocab_size: int) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                    show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(path)
  return path


def sources_table(args):
  from memjax.data import make_pipeline

  root = tempfile.mkdtemp(prefix="memjax_bench_sources_")
  try:
    b, t = map(int, args.source_shape.lower().split("x"))
    docs = synthetic_docs(args.docs, args.doc_bytes)
    ids = [[(3 + c) for c in d.encode()] for d in docs]  # byte ids, for the pre-tokenized row
    t0 = time.perf_counter()
    specs = write_sources(root, docs, ids)
    write_s = time.perf_counter() - t0
    hf_path = hf_tokenizer_json(os.path.join(root, "tokenizer.json"), docs[:1000], args.bpe_vocab_size)
    tokenizers = {"byte": "byte", "bpe": "bpe", "hf": f"hf:{hf_path}"}
    need = consumers(args.mfu)
    rows = []
    for kind in args.source_kinds.split(","):
      for tk_name, workers in itertools.product(
          ["byte"] if kind == "parquet_ids" else args.source_tokenizers.split(","),
          [int(w) for w in args.source_workers.split(",")]):
        fields = dict(source=specs[kind], tokenizer=tokenizers[tk_name], bpe_vocab_size=args.bpe_vocab_size,
                      data_dir=os.path.join(root, "data"), read_threads=0, workers=workers)
        if kind == "parquet_ids":
          fields["tokens_key"] = "ids"
        t0 = time.perf_counter()
        pipe = make_pipeline(seq_len=t, batch_size=b, process_index=0, process_count=1, **fields)
        open_s = time.perf_counter() - t0
        it = pipe.train
        # Packing fills max(B, 32) rows at a time: time whole packing cycles, else a timing can be of
        # rows packed earlier (free).
        cycle = max(b, 32) // b
        n = -(-args.source_batches // cycle) * cycle
        for _ in range(cycle):
          next(it)
        rates = []
        for _ in range(args.repeats):
          start = time.perf_counter()
          for _ in range(n):
            next(it)
          rates.append(n * b * t / (time.perf_counter() - start))
        if workers:
          it.close()
        rate = statistics.median(rates) / max(1, workers)  # per core: one worker process per core
        row = {"source": kind, "tokenizer": "(ids)" if kind == "parquet_ids" else tk_name, "workers": workers,
               "vocab_size": pipe.tokenizer.vocab_size, "batch_size": b, "seq_len": t, "open_s": open_s,
               "tokens_per_s_per_core": rate, "tokens_per_s_all": rates}
        for label, c in need.items():
          row[f"cores_for_2x_{label}"] = 2 * c["tokens_per_s"] / rate
        rows.append(row)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\nmemjax sources, {args.docs} synthetic documents (~{args.doc_bytes} B), written in {write_s:.1f} s; "
        f"B x T = {b} x {t}; median of {args.repeats} timings; read_threads 0; tok/s/core = tokens/s / "
        f"max(1, workers); B*T positions counted")
  for label, c in need.items():
    print(f"  {label}: {c['chips']} chips x {c['peak_flops'] / 1e12:.0f} TFLOP/s x MFU {args.mfu:g} / "
          f"{c['train_flops_per_token'] / 1e9:.2f} GFLOP/token (paper_373m) = {c['tokens_per_s']:,.0f} tokens/s per host")
  print(f"{'source':>12} {'tokenizer':>9} {'V':>5} {'workers':>7} {'tok/s/core':>11} {'cores 2x v5p-8':>15} "
        f"{'cores 2x 8xH100':>16}")
  for r in rows:
    print(f"{r['source']:>12} {r['tokenizer']:>9} {r['vocab_size']:>5} {r['workers']:>7} {r['tokens_per_s_per_core']:>11,.0f} "
          f"{r['cores_for_2x_v5p-8']:>15.1f} {r['cores_for_2x_8xH100']:>16.1f}")
  return {"docs": args.docs, "doc_bytes": args.doc_bytes, "write_s": write_s, "mfu": args.mfu, "consumers": need,
          "rows": rows}


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  result = {"benchmark": "data_pipeline",
            "command": " ".join(["python benchmarks/data_pipeline.py", *(sys.argv[1:] if argv is None else argv)]),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}}
  if args.table in ("both", "kb"):
    result["kb"] = kb_table(args)
  if args.table in ("both", "sources"):
    result["sources"] = sources_table(args)

  import grain
  import sentencepiece
  import tensorflow_datasets as tfds
  import tokenizers

  result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
  result["versions"] = {"grain": grain.__version__, "tensorflow_datasets": tfds.__version__,
                        "sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  run_command(main)
