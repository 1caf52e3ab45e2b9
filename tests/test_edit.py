"""memjax.edit: a written fact is what greedy decoding gives, an erased one is not, and nothing but the
reported value rows changed (bitwise); slot selection against a numpy count; bad input names the field."""

import re

import numpy as np
import pytest
from flax import nnx

from memjax import edit
from memjax.config import GenerateConfig, LMMemoryConfig, MemoryConfig, ModelConfig
from memjax.data.tokenizers import ByteTokenizer
from memjax.generation import generate_text
from memjax.inspect import attribute_answer, raw_reads
from memjax.model import LM

TOK = ByteTokenizer()
MEM = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=16, value_dim=32)
FACT = ("Mara Quill was born in", "Lyon")


def _greedy(model, prompt):
  return generate_text(model, TOK, [prompt], GenerateConfig(max_new_tokens=6), window=64)[0]


def _leaves(model) -> dict:
  return {tuple(p): np.asarray(v[...]).copy() for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_only_rows_changed(before: dict, after: dict, slots: dict):
  """Every leaf bitwise equal, except the reported rows of the value tables."""
  assert before.keys() == after.keys()
  tables = {tuple(k.split("/")) for k in slots}
  for path, old in before.items():
    new = after[path]
    key = tuple(map(str, path))
    if key not in tables:
      assert np.array_equal(old, new), f"{path} changed"
      continue
    rows = np.asarray(slots["/".join(key)], np.int64)
    keep = np.setdiff1d(np.arange(old.shape[0]), rows)
    assert np.array_equal(old[keep], new[keep]), f"{path}: rows not reported changed"
    assert 0 < len(rows) and not np.array_equal(old[rows], new[rows])


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
                    memory=LMMemoryConfig(layer=MEM, layers=(1,)))
  return LM(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def written(model):
  before = _leaves(model)
  out = edit.write(model, [FACT], tokenizer=TOK, top_t=32, lr=0.1, steps=300)
  assert all(np.array_equal(v, _leaves(model)[k]) for k, v in before.items())  # the input is not mutated
  return out


def test_write_makes_greedy_decoding_give_the_answer(model, written):
  assert edit.produces(model, TOK, [FACT]) == [False]
  assert not _greedy(model, FACT[0]).strip().startswith(FACT[1])
  rec = written.record
  assert rec.kind == "write" and rec.success == [True] and 0 < rec.steps <= 300 and rec.margins[0] >= 1.0
  assert edit.produces(written.model, TOK, [FACT]) == [True]
  assert _greedy(written.model, FACT[0]).strip().startswith(FACT[1])


def test_write_changes_only_the_reported_slots(model, written):
  rec = written.record
  (key, slots), = rec.slots.items()
  assert 0 < len(slots) <= 32
  before, after = _leaves(model), _leaves(written.model)
  _assert_only_rows_changed(before, after, rec.slots)
  path = tuple(p for p in before if "/".join(map(str, p)) == key)[0]
  diff = after[path].astype(np.float64) - before[path].astype(np.float64)
  assert rec.update_norms[key] == pytest.approx(np.linalg.norm(diff), rel=1e-6)


def test_write_slots_are_the_most_read_at_the_answer(model):
  """Oracle: count every (head, k) read of each slot at the answer positions; top 8, ties to the lower slot."""
  batch = edit.encode_facts(TOK, edit.as_facts([FACT]))
  idx, _ = raw_reads(model, batch.tokens)[1]
  counts = np.bincount(idx[batch.answer].reshape(-1), minlength=MEM.num_slots)
  order = sorted(np.flatnonzero(counts), key=lambda s: (-counts[s], s))[:8]
  got = edit.write_slots(model, TOK, [FACT], top_t=8)
  assert list(got.values()) == [sorted(int(s) for s in order)]


def test_erase_stops_the_answer_and_changes_only_attributed_slots(written):
  model = written.model
  out = edit.erase(model, [FACT], tokenizer=TOK, top_t=8, lr=0.1, steps=300)
  rec = out.record
  assert rec.kind == "erase" and rec.success == [True] and rec.steps > 0
  assert edit.produces(out.model, TOK, [FACT]) == [False]
  assert not _greedy(out.model, FACT[0]).strip().startswith(FACT[1])
  _assert_only_rows_changed(_leaves(model), _leaves(out.model), rec.slots)
  att = attribute_answer(model, TOK, *FACT, top=64)
  positive = [s["slot"] for s in att["slots"] if s["drop"] > 0][:8]
  assert list(rec.slots.values()) == [sorted(positive)]


@pytest.mark.parametrize("facts, field", [
    ([], "facts"),
    ([{"prompt": "Mara was born in", "city": "Lyon"}], "facts[0].city"),
    ([{"prompt": "Mara was born in"}], "facts[0].answer"),
    ([("Mara was born in", "")], "facts[0].answer"),
    ([("Mara", 3)], "facts[0].answer"),
    ("Mara was born in Lyon", "facts"),
])
def test_bad_facts_raise_naming_the_field(model, facts, field):
  for fn in (edit.write, edit.erase):
    with pytest.raises(ValueError, match="^" + re.escape(field)):
      fn(model, facts, tokenizer=TOK)


@pytest.mark.parametrize("kwargs, field", [
    ({"top_t": 0}, "top_t"), ({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"margin": -1.0}, "margin"),
])
def test_bad_settings_raise_naming_the_field(model, kwargs, field):
  for fn in (edit.write, edit.erase):
    with pytest.raises(ValueError, match=f"^{field}="):
      fn(model, [FACT], tokenizer=TOK, **kwargs)


def test_background_counts_the_texts_that_read_each_slot(model):
  """Oracle: per text, the set of slots its window reads (numpy), counted over the texts."""
  texts = ["Mara was born in Lyon.", "Quill works as a baker.", "Lyon is a city; Mara likes it."]
  df, n = edit.background(model, TOK, texts, window=32)
  want = np.zeros(MEM.num_slots)
  for t in texts:
    ids = [TOK.bos_id] + TOK.encode(t)
    idx, _ = raw_reads(model, np.asarray([ids], np.int32))[1]
    want[np.unique(idx)] += 1
  assert n == 3 and list(df) == ["blocks/1/ffn/values/values"]
  np.testing.assert_array_equal(df["blocks/1/ffn/values/values"], want)


def test_write_slots_with_a_background_are_the_top_by_tfidf(model):
  """Oracle: reads at the answer (numpy count) x log((n + 1) / (df + 1)), top 8, ties to the lower slot."""
  df, n = edit.background(model, TOK, ["Quill works as a baker.", "Mara likes Lyon.", "Quill was born."], window=32)
  key = "blocks/1/ffn/values/values"
  batch = edit.encode_facts(TOK, edit.as_facts([FACT]))
  idx, _ = raw_reads(model, batch.tokens)[1]
  counts = np.bincount(idx[batch.answer].reshape(-1), minlength=MEM.num_slots).astype(np.float64)
  score = counts * np.log((n + 1.0) / (df[key] + 1.0))
  order = sorted(np.flatnonzero(counts), key=lambda s: (-np.float32(score[s]), s))[:8]
  got = edit.write_slots(model, TOK, [FACT], top_t=8, background=df, num_background=n)
  assert got == {key: sorted(int(s) for s in order)}
  assert got != edit.write_slots(model, TOK, [FACT], top_t=8)  # the background changed the choice
