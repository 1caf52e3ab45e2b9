"""The Grain pipeline: packing against a brute-force oracle, sharding, exact resume, make_pipeline."""

import json
import os

import numpy as np
import pytest

from memjax.data import pipeline as pl
from memjax.data.errors import DataError
from memjax.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer

T = 16  # sequence length in the synthetic tests


class IdTokenizer:
  """Test tokenizer: text "i,n" is document i of n tokens, ids 1000*(i+1) + j, unique across documents."""

  kind = "ids"
  vocab_size = 10**7
  pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID

  def encode_array(self, text):
    i, n = map(int, text.split(","))
    return (1000 * (i + 1) + np.arange(n)).astype(np.int32)

  def encode(self, text):
    return self.encode_array(text).tolist()


def make_source(n_docs=40, seed=0, max_len=3 * T):
  lengths = np.random.default_rng(seed).integers(1, max_len, size=n_docs)
  return [{"text": f"{i},{n}"} for i, n in enumerate(lengths)], lengths


def stream(i, n):
  """The (bos, tokens, eos) stream of document i, the oracle for inputs and targets."""
  return [BOS_ID, *(1000 * (i + 1) + np.arange(n)).tolist(), EOS_ID]


def check_batch_and_collect(batch, lengths, batch_size, seq_len=T):
  """Checks one batch against the brute-force oracle; returns the (doc, chunk start) of each segment."""
  assert set(batch) == set(pl.BATCH_KEYS)
  for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)]:
    assert batch[key].dtype == dtype and batch[key].shape == (batch_size, seq_len), key
  seen = []
  for b in range(batch_size):
    inp, tgt, seg, pos, mask = (batch[k][b] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
    pad = seg == 0
    # Padding: a suffix of the row, all zeros, never in the loss.
    n_real = int((~pad).sum())
    assert pad[n_real:].all() and not pad[:n_real].any()
    assert (inp[pad] == PAD_ID).all() and (tgt[pad] == PAD_ID).all() and (pos[pad] == 0).all()
    np.testing.assert_array_equal(mask, (~pad).astype(np.float32))
    # Segments are numbered 1, 2, ... left to right, each a contiguous run.
    ids = seg[:n_real]
    if n_real:
      assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for s in np.unique(ids):
      where = np.flatnonzero(seg == s)
      assert where[-1] - where[0] + 1 == len(where)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart at 0
      x, y = inp[where].tolist(), tgt[where].tolist()
      # Which document: the one whose tokens appear in the segment (unique ids per document).
      doc_ids = {(t // 1000) - 1 for t in x + y if t >= 1000}
      assert len(doc_ids) == 1, f"segment mixes documents {doc_ids}"
      (d,) = doc_ids
      full = stream(d, int(lengths[d]))
      start = full.index(x[0]) if x[0] != BOS_ID else 0
      assert start % seq_len == 0, "a chunk starts at a multiple of seq_len of its document"
      # Oracle: every position in the loss predicts the next token of the same document.
      assert x == full[start:start + len(x)]
      assert y == full[start + 1:start + 1 + len(y)]
      assert len(x) == min(seq_len, len(full) - 1 - start), "chunks are cut only at seq_len"
      seen.append((d, start))
  return seen


@pytest.mark.parametrize("batch_size,bins", [(4, None), (3, 2)])
def test_packing_matches_the_brute_force_oracle_and_covers_every_chunk(batch_size, bins):
  source, lengths = make_source()
  ds = pl.batch_dataset(source, IdTokenizer(), seq_len=T, batch_size=batch_size, seed=1, num_epochs=1,
                        process_index=0, process_count=1, num_packing_bins=bins)
  seen = []
  for batch in ds:
    seen += check_batch_and_collect(batch, lengths, batch_size)
  expected = [(d, s) for d, n in enumerate(lengths) for s in range(0, int(n) + 1, T)]
  assert sorted(seen) == sorted(expected), "each chunk of each document exactly once in an epoch"
  assert any(n + 1 > T for n in lengths), "the test includes documents longer than T"


def test_byte_pipeline_targets_are_next_bytes_and_eos_ends_documents():
  tok = ByteTokenizer()
  texts = ["Köln ✓", "a", "x" * 40]
  ds = pl.batch_dataset([{"text": t} for t in texts], tok, seq_len=T, batch_size=2, shuffle=False,
                        num_epochs=1, process_index=0, process_count=1)
  docs = {}
  for batch in ds:
    for b in range(2):
      for s in np.unique(batch["segment_ids"][b][batch["segment_ids"][b] > 0]):
        where = batch["segment_ids"][b] == s
        x, y = batch["inputs"][b][where], batch["targets"][b][where]
        np.testing.assert_array_equal(x[1:], y[:-1])  # targets are inputs shifted by one
        docs.setdefault(int(y[-1] == EOS_ID), []).append(tok.decode(y))
  # Each document's last chunk ends with eos: "x" * 40 is 41 pairs, chunks of 16, 16 and 9.
  assert sorted(docs[1]) == sorted(["Köln ✓", "a", "x" * 8])
  assert sorted(docs[0]) == ["x" * 16, "x" * 16]


def test_process_shards_are_disjoint_and_cover_the_data():
  source, lengths = make_source(n_docs=31)
  docs_by_process = []
  for index in range(3):
    ds = pl.batch_dataset(source, IdTokenizer(), seq_len=T, batch_size=4, seed=5, num_epochs=1,
                          process_index=index, process_count=3)
    seen = [d for batch in ds for d, _ in check_batch_and_collect(batch, lengths, 4)]
    docs_by_process.append(set(seen))
  a, b, c = docs_by_process
  assert not (a & b) and not (a & c) and not (b & c)
  assert a | b | c == set(range(31))
  assert [len(s) for s in docs_by_process] == [11, 10, 10]


def test_process_index_defaults_to_jax_and_is_checked():
  assert pl.resolve_process(None, None) == (0, 1)  # a single-process JAX run
  with pytest.raises(DataError, match=r"process_index=3 must be an int in \[0, process_count=3\)"):
    pl.resolve_process(3, 3)


@pytest.mark.parametrize("steps_before", [0, 3, 11])
def test_restored_state_yields_exactly_the_next_batches(steps_before):
  source, _ = make_source(n_docs=25, seed=2)

  def fresh():
    return iter(pl.batch_dataset(source, IdTokenizer(), seq_len=T, batch_size=3, seed=7,
                                 process_index=0, process_count=1))

  it = fresh()
  for _ in range(steps_before):  # 11 steps cross an epoch boundary of this small source
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the state survives a JSON round trip
  expected = [next(it) for _ in range(4)]
  resumed = fresh()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in pl.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])


def test_different_seeds_shuffle_differently_and_epochs_reshuffle():
  source, _ = make_source(n_docs=20, seed=3, max_len=4)  # one document per row segment, short

  def first_docs(seed, n_batches):
    it = iter(pl.batch_dataset(source, IdTokenizer(), seq_len=T, batch_size=4, seed=seed,
                               process_index=0, process_count=1, num_packing_bins=4))
    return [next(it)["inputs"][:, 1].tolist() for _ in range(n_batches)]

  assert first_docs(0, 3) == first_docs(0, 3)
  assert first_docs(0, 3) != first_docs(1, 3)


def test_chunks_of_a_long_document():
  chunks = pl.document_chunks(np.arange(10, 30, dtype=np.int32), seq_len=8, bos_id=BOS_ID, eos_id=EOS_ID)
  assert [len(c["inputs"]) for c in chunks] == [8, 8, 5]  # 20 tokens + eos = 21 pairs
  joined_in = np.concatenate([c["inputs"] for c in chunks])
  joined_tg = np.concatenate([c["targets"] for c in chunks])
  np.testing.assert_array_equal(joined_in, [BOS_ID, *range(10, 30)])
  np.testing.assert_array_equal(joined_tg, [*range(10, 30), EOS_ID])


def test_make_pipeline_on_the_tiny_knowledge_base(tmp_path):
  pipe = pl.make_pipeline(seq_len=64, batch_size=4, kb="tiny", data_dir=tmp_path, seed=0,
                          process_index=0, process_count=1)
  assert pipe.source == "memjax_knowledge/tiny" and pipe.tokenizer_path is None
  assert len(pipe.qa_items) == 20 * 6
  assert pipe.metadata["train"] == 80
  batch = next(pipe.train)
  assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
      "inputs": ("int32", (4, 64)), "targets": ("int32", (4, 64)), "loss_mask": ("float32", (4, 64)),
      "segment_ids": ("int32", (4, 64)), "positions": ("int32", (4, 64))}
  assert batch["loss_mask"].mean() > 0.5
  text = pipe.tokenizer.decode(batch["inputs"][0])
  assert any(item.prompt.split(" ")[0] in text for item in pipe.qa_items)
  val = list(pipe.validation())
  assert sum(int((b["targets"][b["loss_mask"] > 0] == pipe.tokenizer.eos_id).sum()) for b in val) == 20
  # Resume through make_pipeline: a fresh pipeline restored to a state gives the same next batch.
  state = pipe.train.get_state()
  want = next(pipe.train)
  again = pl.make_pipeline(seq_len=64, batch_size=4, kb="tiny", data_dir=tmp_path, seed=0,
                           process_index=0, process_count=1)
  again.train.set_state(state)
  np.testing.assert_array_equal(next(again.train)["inputs"], want["inputs"])


def test_kb_questions_mixes_the_trained_half_into_training_and_scores_the_other(tmp_path):
  common = dict(seq_len=512, batch_size=4, kb="tiny", data_dir=tmp_path, seed=0, process_index=0, process_count=1)
  plain, mixed = pl.make_pipeline(**common), pl.make_pipeline(kb_questions=True, **common)
  assert plain.qa_question_items == [] and len(mixed.qa_question_items) == 10 * 6
  assert all(it.prompt.startswith("Q: ") for it in mixed.qa_question_items)
  assert mixed.qa_items == plain.qa_items  # the verbatim probe is unchanged
  def one_epoch_text(pipe, docs):
    ends, text = 0, []
    while ends < docs:
      b = next(pipe.train)
      ends += int((b["targets"][b["loss_mask"] > 0] == pipe.tokenizer.eos_id).sum())
      text += [pipe.tokenizer.decode(row) for row in b["inputs"]]
    return "\n".join(text)
  assert "Q: " not in one_epoch_text(plain, 80)
  text = one_epoch_text(mixed, 90)  # 80 biographies + 10 question documents
  assert text.count("Q: ") >= 10 * 6 * 0.9  # (a batch boundary may cut a few)
  (tmp_path / "notes.txt").write_text("Some local text, no knowledge base.\n" * 20)
  local = pl.make_pipeline(kb_questions=True, text_glob=str(tmp_path / "*.txt"), **common)  # like kb: no effect
  assert local.qa_question_items == [] and "Q: " not in local.tokenizer.decode(next(local.train)["inputs"][0])


def test_text_source_reads_what_tfds_decodes(tmp_path):
  from memjax.data.knowledge import prepare_knowledge

  builder = prepare_knowledge(tmp_path, "tiny")
  for split in ("train", "validation"):
    fast, full = pl.TextSource(builder, split), builder.as_data_source(split)
    assert len(fast) == len(full)
    assert [fast[i]["text"] for i in range(len(fast))] == [full[i]["text"] for i in range(len(full))]


def test_make_pipeline_bpe_is_trained_once_and_stored_with_the_data(tmp_path):
  kwargs = dict(seq_len=32, batch_size=2, kb="tiny", tokenizer="bpe", bpe_vocab_size=384, data_dir=tmp_path,
                process_index=0, process_count=1)
  pipe = pl.make_pipeline(**kwargs)
  assert pipe.tokenizer.kind == "bpe" and pipe.tokenizer_path.startswith(str(tmp_path))
  mtime = os.path.getmtime(pipe.tokenizer_path)
  again = pl.make_pipeline(**kwargs)
  assert os.path.getmtime(again.tokenizer_path) == mtime  # loaded, not retrained
  batch = next(again.train)
  assert batch["inputs"].max() < again.tokenizer.vocab_size
  item = pipe.qa_items[0]
  assert pipe.tokenizer.decode(pipe.tokenizer.encode(item.prompt)) == item.prompt


def test_make_pipeline_on_local_text_with_a_qa_file(tmp_path):
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  for i in range(12):
    (corpus / "sub" / f"note{i}.md").write_text(f"# Note {i}\nSome text about item {i}, ünïcode.\n")
  (corpus / "code.py").write_text("def f():\n  return 1\n")
  (corpus / "docs.jsonl").write_text('{"text": "first"}\n{"text": "second", "id": 2}\n')
  (corpus / "skip.bin").write_bytes(b"\x00\x01")
  qa = tmp_path / "qa.jsonl"
  qa.write_text('{"prompt": "The answer is", "answer": "42"}\n')
  pipe = pl.make_pipeline(seq_len=32, batch_size=2, text_glob=str(corpus / "**" / "*"), data_dir=tmp_path / "d",
                          qa_jsonl=qa, process_index=0, process_count=1)
  assert pipe.source.startswith("memjax_local_text/g")
  assert [(q.prompt, q.answer) for q in pipe.qa_items] == [("The answer is", "42")]
  assert pipe.metadata["train"] + pipe.metadata["validation"] == 15
  assert pipe.metadata["validation"] >= 1 and pipe.validation is not None
  batch = next(pipe.train)
  assert batch["loss_mask"].sum() > 0
