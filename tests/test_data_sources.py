"""Outside sources (TFDS, ArrayRecord, Parquet, JSONL, mixtures): every document read once, disjoint
shards across 2 processes, exact resume mid-epoch, mixture weights, one-line errors, train.py on each."""

import json
import os
import re

import numpy as np
import pytest

from memjax.data import make_pipeline
from memjax.data import sources as src
from memjax.data.errors import DataError

N_FILES, PER_FILE = 3, 20
KINDS = ("tfds", "array_record", "parquet", "jsonl")


def doc_text(i):
  return f"document {i:03d}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(i % 9 + 3))


def doc_ids(i):
  return (np.arange(i % 5 + 2) + 3 * i + 10).astype(np.int64)


def write_jsonl(d, n_files=N_FILES, per_file=PER_FILE, text=doc_text, offset=0):
  d.mkdir(parents=True, exist_ok=True)
  for f in range(n_files):
    lines = [json.dumps({"text": text(offset + f * per_file + r), "ids": doc_ids(offset + f * per_file + r).tolist()})
             for r in range(per_file)]
    (d / f"part-{f}.jsonl").write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
  return f"jsonl:{d}/*.jsonl"


def write_parquet(d):
  import pyarrow as pa
  import pyarrow.parquet as pq

  d.mkdir(parents=True, exist_ok=True)
  for f in range(N_FILES):
    idx = range(f * PER_FILE, (f + 1) * PER_FILE)
    table = pa.table({"text": [doc_text(i) for i in idx],
                      "ids": pa.array([doc_ids(i).tolist() for i in idx], pa.list_(pa.int32()))})
    pq.write_table(table, d / f"part-{f}.parquet", row_group_size=7)  # 3 row groups per file
  return f"parquet:{d}/*.parquet"


def example_bytes(i):
  from tensorflow_datasets.proto import tf_example_pb2

  ex = tf_example_pb2.Example()
  ex.features.feature["text"].bytes_list.value.append(doc_text(i).encode())
  ex.features.feature["ids"].int64_list.value.extend(doc_ids(i).tolist())
  return ex.SerializeToString()


def write_array_record(d):
  from array_record.python.array_record_module import ArrayRecordWriter

  d.mkdir(parents=True, exist_ok=True)
  for f in range(N_FILES):
    w = ArrayRecordWriter(str(d / f"part-{f}.array_record"), "group_size:1")
    for i in range(f * PER_FILE, (f + 1) * PER_FILE):
      w.write(example_bytes(i) if i % 2 else json.dumps({"text": doc_text(i), "ids": doc_ids(i).tolist()}).encode())
    w.close()
  return f"array_record:{d}/*.array_record"


def write_tfds(data_dir):
  import tensorflow_datasets as tfds

  from memjax.data._tfds import code_path_of, quiet_prepare

  class MemjaxTestCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = code_path_of(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(), "ids": tfds.features.Tensor(shape=(None,), dtype=np.int64)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, N_FILES * PER_FILE),
              "validation": self._generate_examples(1000, 1010)}

    def _generate_examples(self, a, b):
      for i in range(a, b):
        yield i, {"text": doc_text(i), "ids": doc_ids(i)}

  quiet_prepare(MemjaxTestCorpus(data_dir=str(data_dir), file_format="array_record"))
  return "tfds:memjax_test_corpus:1.0.0"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  data_dir = root / "data"
  return {"tfds": write_tfds(data_dir), "array_record": write_array_record(root / "ar"),
          "parquet": write_parquet(root / "pq"), "jsonl": write_jsonl(root / "jl"), "data_dir": str(data_dir),
          "root": root}


ALL_TEXTS = {doc_text(i) for i in range(N_FILES * PER_FILE)}
ALL_IDS = {tuple(doc_ids(i).tolist()) for i in range(N_FILES * PER_FILE)}


def read_all(opened):
  return [opened.values[i] for i in range(len(opened.values))]


@pytest.mark.parametrize("kind", KINDS)
def test_every_document_once_and_two_processes_disjoint(corpora, kind):
  for tokens_key in (None, "ids"):
    common = dict(data_dir=corpora["data_dir"], tokens_key=tokens_key)
    one = read_all(src.open_source(corpora[kind], **common))
    got = [tuple(v.tolist()) for v in one] if tokens_key else one
    assert sorted(got) == sorted(ALL_IDS if tokens_key else ALL_TEXTS)
    shards = []
    for p in range(2):
      o = src.open_source(corpora[kind], process_index=p, process_count=2, **common)
      vals = read_all(o)[o.doc_index::o.doc_count]
      shards.append({tuple(v.tolist()) if tokens_key else v for v in vals})
      if kind != "tfds":  # 3 files over 2 processes: each reads only its own files
        assert o.doc_count == 1 and len(o.files) == (2, 1)[p]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == (ALL_IDS if tokens_key else ALL_TEXTS)


def test_block_permutation_is_a_new_block_order_each_epoch():
  sizes = [3, 5, 2, 4]
  perms = [src.block_permutation(sizes, seed=1, epoch=e) for e in range(3)]
  starts = np.cumsum([0] + sizes)
  for p in perms:
    assert sorted(p.tolist()) == list(range(14))
    block = np.searchsorted(starts, p, side="right") - 1
    assert (np.diff(block) != 0).sum() == len(sizes) - 1  # each block's rows stay together
  assert not np.array_equal(perms[0], perms[1])
  np.testing.assert_array_equal(perms[0], src.block_permutation(sizes, seed=1, epoch=0))


def test_parse_source_and_mixture():
  assert src.parse_source("tfds:c4/en:3.1.0") == src.SourceSpec("tfds", "c4/en:3.1.0")
  assert src.parse_mixture("jsonl:/a=1,parquet:/b/x=y.parquet=3") == [("jsonl:/a", 0.25),
                                                                      ("parquet:/b/x=y.parquet", 0.75)]
  for bad in ("c4", "csv:/a/*", "jsonl:"):
    with pytest.raises(DataError, match="must be one of 'tfds:NAME"):
      src.parse_source(bad)
  for bad in ("jsonl:/a", "jsonl:/a=0", "jsonl:/a=-1", "jsonl:/a=x", ""):
    with pytest.raises(DataError, match="mixture"):
      src.parse_mixture(bad)


def batches(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("case", [*KINDS, "tokens", "mixture"])
def test_exact_resume_mid_epoch(corpora, case):
  """4 batches, state, 3 more; a fresh pipeline set to the state gives the same 3 (mid-epoch: 60
  documents of ~60 bytes fill ~14 batches of 4 x 64)."""
  fields = dict(data_dir=corpora["data_dir"], seed=3)
  if case == "tokens":
    fields.update(source=corpora["parquet"], tokens_key="ids")
  elif case == "mixture":
    fields.update(mixture=f"{corpora['jsonl']}=2, {corpora['parquet']}=1")
  else:
    fields.update(source=corpora[case])
  make = lambda: make_pipeline(seq_len=64, batch_size=4, process_index=0, process_count=1, **fields)  # noqa: E731
  pipe = make()
  batches(pipe.train, 4)
  state = pipe.train.get_state()
  json.dumps(state)
  expected = batches(pipe.train, 3)
  again = make()
  again.train.set_state(state)
  for a, b in zip(expected, batches(again.train, 3), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # And the stream is the documents: decoded segments are whole documents of the source.
  tok = pipe.tokenizer
  for batch in expected:
    for row, seg in zip(batch["inputs"], batch["segment_ids"]):
      for s in set(seg[seg > 0].tolist()):
        ids = row[seg == s]
        if ids[0] == tok.bos_id and case != "tokens":
          assert any(t.startswith(tok.decode(ids[1:])) for t in ALL_TEXTS)
  if case == "tfds":
    assert pipe.validation is not None and pipe.metadata["validation"] == 10
    val = list(pipe.validation())
    assert sum(float(b["loss_mask"].sum()) for b in val) == sum(len(doc_text(i).encode()) + 1 for i in range(1000, 1010))


def test_mixture_weights_are_honoured(tmp_path):
  a = write_jsonl(tmp_path / "a", n_files=1, per_file=30, text=lambda i: f"A{i:03d}")
  b = write_jsonl(tmp_path / "b", n_files=1, per_file=30, text=lambda i: f"B{i:03d}")
  pipe = make_pipeline(seq_len=32, batch_size=8, mixture=f"{a}=0.8, {b}=0.2", data_dir=tmp_path / "d",
                       process_index=0, process_count=1)
  counts = {"A": 0, "B": 0}
  for batch in batches(pipe.train, 20):
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    for letter in batch["inputs"][np.roll(starts, 1, axis=1)]:  # the token after each bos
      counts[chr(letter - 3)] += 1
  total = counts["A"] + counts["B"]
  assert total > 300, counts
  assert abs(counts["A"] / total - 0.8) < 0.03, counts


def one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(DataError, match=match) as err:
    fn(*args, **kwargs)
  assert "\n" not in str(err.value)
  return str(err.value)


def test_bad_sources_give_one_line_and_write_nothing(corpora, tmp_path):
  root = corpora["root"]
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  common = dict(seq_len=16, batch_size=2, data_dir=data_dir, process_index=0, process_count=1)
  one_line_error(re.escape(f"source 'jsonl:{tmp_path}/none/*.jsonl' matched no files"), make_pipeline,
                 source=f"jsonl:{tmp_path}/none/*.jsonl", **common)
  msg = one_line_error(r"source 'tfds:c4/en:3.1.0': no prepared dataset 'c4/en:3.1.0' in data_dir", make_pipeline,
                       source="tfds:c4/en:3.1.0", **common)
  assert "tfds build c4/en" in msg and "never downloads" in msg
  for kind in KINDS:
    one_line_error(rf"source '{re.escape(corpora[kind])}'.*no (field|column) 'body'", make_pipeline,
                   source=corpora[kind], text_key="body", **dict(common, data_dir=corpora["data_dir"]))
  one_line_error(r"no split 'test'", make_pipeline, source=corpora["tfds"], split="test",
                 **dict(common, data_dir=corpora["data_dir"]))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet at all")
  (tmp_path / "bad" / "x.array_record").write_bytes(b"not an array record file" * 10)
  one_line_error(r"unreadable Parquet shard .*x.parquet", make_pipeline,
                 source=f"parquet:{tmp_path}/bad/*.parquet", **common)
  one_line_error(r"source 'array_record:.*': unreadable ArrayRecord shard", make_pipeline,
                 source=f"array_record:{tmp_path}/bad/*.array_record", **common)
  (tmp_path / "bad" / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  one_line_error(r"x.jsonl:2: not valid JSON", lambda: [next(make_pipeline(
      source=f"jsonl:{tmp_path}/bad/*.jsonl", seed=1, **common).train) for _ in range(3)])
  (tmp_path / "big").mkdir()
  (tmp_path / "big" / "t.jsonl").write_text('{"ids": [5, 7000]}\n')
  one_line_error(r"token ids in \[5, 7000\] do not fit the tokenizer's vocab_size=259", make_pipeline,
                 source=f"jsonl:{tmp_path}/big/*.jsonl", tokens_key="ids", **common)
  one_line_error(r"tokenizer='bpe' trains on text, but tokens_key='ids' reads token ids", make_pipeline,
                 source=corpora["jsonl"], tokens_key="ids", tokenizer="bpe", **common)
  assert os.listdir(data_dir) == []  # nothing half-written
  # A TFDS dataset prepared as tfrecord (random access needs array_record): says how to rebuild it.
  import shutil
  shutil.copytree(corpora["data_dir"], tmp_path / "tfrecord")
  info = next((tmp_path / "tfrecord").glob("memjax_test_corpus/1.0.0/dataset_info.json"))
  info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
  one_line_error(r"not prepared as array_record in .*; rebuild it with `tfds build memjax_test_corpus "
                 r"--data_dir=.* --file_format=array_record`", make_pipeline, source=corpora["tfds"],
                 **dict(common, data_dir=tmp_path / "tfrecord"))


@pytest.mark.parametrize("case", [*KINDS, "mixture"])
def test_train_on_each_source_resumes_bit_exactly(corpora, tmp_path, case):
  """train.py's loop on each source kind (tiny model, 6 steps): stopping at step 3 (mid-epoch: ~8
  batches per epoch) and resuming ends with the same parameters as never stopping."""
  from helpers import checkpoint_leaves, tiny_raw
  from memjax.config_bridge import config_from_dict
  from memjax.train.loop import run

  raw = tiny_raw(corpora["data_dir"], steps=6)
  if case == "mixture":
    raw.data.mixture = f"{corpora['jsonl']}=1, {corpora['tfds']}=1"
  else:
    raw.data.source = corpora[case]
  if case == "parquet":
    raw.data.tokens_key = "ids"  # pre-tokenized ids (all < 259, the byte tokenizer's vocabulary)
  cfg = config_from_dict(raw)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r1 = run(cfg, str(straight), progress=False)
  assert r1.step == 6 and np.isfinite(r1.metrics["loss"])
  assert run(cfg, str(resumed), progress=False, max_steps=3).step == 3
  assert run(cfg, str(resumed), progress=False).step == 6
  for a, b in zip(checkpoint_leaves(straight), checkpoint_leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  if case == "tfds":
    assert "val_loss" in r1.metrics  # the dataset's validation split


def test_train_py_bad_source_or_tokenizer_exits_2_with_one_line(corpora, tmp_path):
  import subprocess

  from helpers import one_error_line, subprocess_env, tiny_raw, train_py
  from memjax.train.main import train_main

  out = subprocess.run(train_py(f"--config.data.source=jsonl:{tmp_path}/none/*.jsonl", data_dir=tmp_path / "d",
                                workdir=tmp_path / "w"), capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
  assert out.returncode == 2, out.stderr[-2000:]
  assert one_error_line(out.stderr) == f"error: source 'jsonl:{tmp_path}/none/*.jsonl' matched no files"
  assert not (tmp_path / "w").exists() and not (tmp_path / "d").exists()
  raw = tiny_raw(corpora["data_dir"])
  raw.data.source = corpora["jsonl"]
  raw.data.tokenizer = f"hf:{tmp_path}/missing/tokenizer.json"
  assert train_main(raw, str(tmp_path / "w2")) == 2
  assert not (tmp_path / "w2").exists()


def test_bpe_trained_on_a_source_is_stored_once(corpora, tmp_path):
  common = dict(seq_len=32, batch_size=2, source=corpora["jsonl"], tokenizer="bpe", bpe_vocab_size=320,
                data_dir=tmp_path, process_index=0, process_count=1)
  pipe = make_pipeline(**common)
  assert pipe.tokenizer_path.startswith(str(tmp_path / "memjax_tokenizers" / "bpe_320_"))
  mtime = os.stat(pipe.tokenizer_path).st_mtime_ns
  again = make_pipeline(**common)
  assert again.tokenizer_path == pipe.tokenizer_path and os.stat(pipe.tokenizer_path).st_mtime_ns == mtime
  assert again.tokenizer.decode(again.tokenizer.encode(doc_text(5))) == doc_text(5)


def test_worker_processes_resume_exactly(corpora):
  """data.workers=2: Grain runs the pipeline in 2 processes (documents split between them); the state
  is still JSON and a fresh pipeline set to it continues with the same batches."""
  make = lambda: make_pipeline(seq_len=64, batch_size=4, source=corpora["jsonl"], data_dir=corpora["data_dir"],  # noqa: E731
                               workers=2, process_index=0, process_count=1)
  pipe = make()
  seen = batches(pipe.train, 3)
  state = json.loads(json.dumps(pipe.train.get_state()))
  expected = batches(pipe.train, 3)
  again = make()
  again.train.set_state(state)
  got = batches(again.train, 3)
  for it in (pipe.train, again.train):
    it.close()
  for a, b in zip(expected, got, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert any(seen[0]["inputs"].ravel())


def test_jsonl_line_index_against_split_lines(tmp_path):
  """The chunked line index equals splitting the whole file, for every chunk size (1 byte up)."""
  import random

  rng = random.Random(0)
  for trial in range(100):
    lines = [rng.choice(["", " ", "\t \r", '{"a": 1}', "x" * rng.randint(1, 30)]) for _ in range(rng.randint(0, 10))]
    blob = "\n".join(lines).encode() + (b"\n" if trial % 2 else b"")
    path = tmp_path / f"{trial}.jsonl"
    path.write_bytes(blob)
    spans, numbers, pos = [], [], 0
    for i, raw in enumerate(blob.split(b"\n")):
      end = min(len(blob), pos + len(raw) + 1)
      if raw.strip():
        spans.append([pos, end])
        numbers.append(i + 1)
      pos = end
    for chunk in (1, 3, 7, 1 << 20):
      got_spans, got_numbers = src.line_index(str(path), chunk)
      assert got_spans.tolist() == spans and got_numbers.tolist() == numbers
  (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}')
  o = src.open_source(f"jsonl:{tmp_path}/bom.jsonl", data_dir=str(tmp_path))
  assert read_all(o) == ["first", "second"]


def test_parquet_epochs_are_block_shuffled_permutations(corpora):
  """Each epoch of a Parquet source holds every document once, row groups kept together, in a new order."""
  from memjax.data.pipeline import document_dataset
  from memjax.data.tokenizers import ByteTokenizer

  o = src.open_source(corpora["parquet"], data_dir=corpora["data_dir"])
  assert o.block_sizes == [7, 7, 6] * N_FILES and o.doc_count == 1
  docs = document_dataset(o.values, ByteTokenizer(), seed=5, block_sizes=o.block_sizes)
  n = len(o.values)
  text = lambda ids: bytes((np.asarray(ids) - 3).astype(np.uint8).tolist()).decode()  # noqa: E731
  epochs = [[text(docs[e * n + i]) for i in range(n)] for e in range(2)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(ALL_TEXTS)
    index = [int(t.split(":")[0].split()[1]) for t in epoch]  # document i is row i % 20 of file i // 20
    group = [(i // PER_FILE, (i % PER_FILE) // 7) for i in index]
    assert sum(a != b for a, b in zip(group, group[1:])) == len(o.block_sizes) - 1
  assert epochs[0] != epochs[1]


def test_tfds_dataset_known_only_by_its_files(corpora, tmp_path):
  """A prepared dataset whose builder code is not importable here (as c4's is not, without TensorFlow):
  TFDS reads it from its files; a name without its config says which configs there are."""
  import shutil

  version_dir = tmp_path / "c4" / "en" / "3.1.0"
  shutil.copytree(os.path.join(corpora["data_dir"], "memjax_test_corpus", "1.0.0"), version_dir)
  for path in version_dir.iterdir():
    path.rename(version_dir / path.name.replace("memjax_test_corpus", "c4"))
  info = json.loads((version_dir / "dataset_info.json").read_text())
  info.update(name="c4", configName="en", version="3.1.0")
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  for target in ("c4/en:3.1.0", "c4/en"):
    o = src.open_source(f"tfds:{target}", data_dir=str(tmp_path))
    assert sorted(read_all(o)) == sorted(ALL_TEXTS)
  one_line_error(re.escape(f"source 'tfds:c4': {tmp_path}/c4 holds the configs ['en']; name one, e.g. 'tfds:c4/en'"),
                 src.open_source, "tfds:c4", data_dir=str(tmp_path))
