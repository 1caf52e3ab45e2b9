"""memjax.inspect against brute force: merged reads, slot removal (= zeroing the rows when the memory is
the last block), attribution, top contexts and key usage."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import inspect as mi
from memjax.config import LMMemoryConfig, MemoryConfig, ModelConfig
from memjax.data.tokenizers import ByteTokenizer
from memjax.model import LM

TOK = ByteTokenizer()
MEM = MemoryConfig(n_keys=8, heads=2, k=4, key_dim=16, value_dim=32)
DOCS = ["Mara was born in Lyon.", "Quill works as a baker.", "Lyon is a city; Mara likes it."]


@pytest.fixture(scope="module")
def model():
  # The memory is the last block: a read at position p changes only the logits at p.
  cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
                    memory=LMMemoryConfig(layer=MEM, layers=(1,)))
  return LM(cfg, rngs=nnx.Rngs(0))


def test_merge_heads_equals_a_dictionary_sum():
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 6, (3, 2, 4))
  w = rng.random((3, 2, 4))
  slots, weights = mi.merge_heads(idx, w)
  for t in range(3):
    want: dict[int, float] = {}
    for s, x in zip(idx[t].ravel(), w[t].ravel()):
      want[int(s)] = want.get(int(s), 0.0) + float(x)
    got = {int(s): float(x) for s, x in zip(slots[t], weights[t]) if s >= 0}
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) < 1e-12 for s in want)
    assert list(weights[t]) == sorted(weights[t], reverse=True)


def test_slots_read_per_position_sum_to_one_per_head(model):
  reads = mi.slots_read(model, [TOK.bos_id] + TOK.encode("Mara"))
  assert len(reads) == 5
  for pos in reads:
    assert {r.layer for r in pos} == {1}
    assert sum(r.weight for r in pos) == pytest.approx(MEM.heads)
    assert [r.weight for r in pos] == sorted((r.weight for r in pos), reverse=True)


def _zeroed_rows_logprob(model, prompt, answer, rows, block=1):
  """Oracle: zero the rows in a copy of the value table and score the answer with the plain forward."""
  q = mi._question(TOK, prompt, answer)
  clone = nnx.clone(model)  # (nnx.merge of split state would share the Variables with ``model``)
  table = clone.blocks[block].ffn.values.values
  table[...] = table[...].at[jnp.asarray(rows, jnp.int32)].set(0.0)
  logp = np.asarray(jax_log_softmax(clone(jnp.asarray(q.tokens[None]))[0][0]))
  return float(logp[np.arange(len(q.tokens)), q.targets][q.positions].sum())


def jax_log_softmax(x):
  import jax
  return jax.nn.log_softmax(x, axis=-1)


def test_removing_slots_equals_zeroing_their_rows(model):
  prompt, answer = "Mara was born in", "Lyon"
  reads = mi.answer_reads(model, TOK, prompt, answer)
  read_slots = [r.slot for r in reads]
  unread = next(s for s in range(MEM.num_slots) if s not in read_slots)
  sets = [[], [(1, read_slots[0])], [(1, s) for s in read_slots[:5]], [(1, unread)]]
  scored = mi.answer_with_slots_removed(model, TOK, prompt, answer, sets)
  for s, got in zip(sets, scored):
    want = _zeroed_rows_logprob(model, prompt, answer, [slot for _, slot in s] or [unread])
    assert got["logprob"] == pytest.approx(want, abs=1e-4)
  assert scored[3]["logprob"] == pytest.approx(scored[0]["logprob"], abs=1e-6)  # an unread slot: no change
  assert scored[2]["logprob"] != pytest.approx(scored[0]["logprob"], abs=1e-3)


def test_removing_slots_everywhere_equals_zeroing_their_rows():
  # The memory in the first block: reads at the prompt's positions reach the answer through attention,
  # so removal everywhere (at="all") is zeroing the rows, and differs from removal at the answer only.
  cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64,
                    memory=LMMemoryConfig(layer=MEM, layers=(0,)))
  first = LM(cfg, rngs=nnx.Rngs(1))
  prompt, answer = "Mara was born in", "Lyon"
  q = mi._question(TOK, prompt, answer)
  idx, _ = mi.raw_reads(first, q.tokens[None])[0]
  early = sorted({int(s) for s in idx[0][:3].reshape(-1)})  # read by the first three (prompt) positions
  got_all, got_answer = (mi.answer_with_slots_removed(first, TOK, prompt, answer, [[(0, s) for s in early]], at=at)[0]
                         for at in ("all", "answer"))
  assert got_all["logprob"] == pytest.approx(_zeroed_rows_logprob(first, prompt, answer, early, block=0), abs=1e-4)
  assert got_all["logprob"] != pytest.approx(got_answer["logprob"], abs=1e-4)
  with pytest.raises(ValueError, match="at='prompt'"):
    mi.answer_with_slots_removed(first, TOK, prompt, answer, [[]], at="prompt")


def test_attribution_ranks_single_slot_removals(model):
  att = mi.attribute_answer(model, TOK, "Mara was born in", "Lyon", top=6)
  drops = [s["drop"] for s in att["slots"]]
  assert len(drops) == 6 and drops == sorted(drops, reverse=True)
  best = att["slots"][0]
  want = att["logprob"] - _zeroed_rows_logprob(model, "Mara was born in", "Lyon", [best["slot"]])
  assert best["drop"] == pytest.approx(want, abs=1e-4)
  assert {(s["layer"], s["slot"]) for s in att["slots"]} == {(r.layer, r.slot) for r in att["reads"][:6]}


def test_top_contexts_and_key_usage_against_brute_force(model, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(DOCS) + "\n")
  usage = mi.key_usage(model, TOK, str(corpus), window=16, batch_size=4)[1]
  n_positions = sum(1 + len(TOK.encode(d)) for d in DOCS)
  assert usage.sum() == pytest.approx(MEM.heads * n_positions)
  slot = int(np.argmax(usage))
  brute = []
  for d, text in enumerate(DOCS):
    ids = [TOK.bos_id] + TOK.encode(text)
    for t, pos in enumerate(mi.slots_read(model, ids)):  # whole documents, no windows
      w = sum(r.weight for r in pos if r.slot == slot)
      if w > 0:
        brute.append((w, d, t))
  brute.sort(key=lambda x: -x[0])
  # Windows of 16 tokens restart the context: compare with windows as long as the longest document.
  got = mi.top_contexts(model, TOK, DOCS, layer=1, slot=slot, window=32, top=3, batch_size=4)
  assert [(g["doc"], g["position"]) for g in got] == [(d, t) for _, d, t in brute[:3]]
  assert all(g["weight"] == pytest.approx(w, abs=1e-5) for g, (w, _, _) in zip(got, brute))
  ids = [TOK.bos_id] + TOK.encode(DOCS[got[0]["doc"]])
  assert got[0]["context"] == TOK.decode(ids[max(0, got[0]["position"] - 11):got[0]["position"] + 1])
  with pytest.raises(ValueError, match="not a memory block"):
    mi.top_contexts(model, TOK, DOCS, layer=0, slot=0)
