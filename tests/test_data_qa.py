"""QA exact match with a fake model whose answers are known."""

import numpy as np
import pytest

from memjax.data import qa
from memjax.data.tokenizers import ByteTokenizer

ITEMS = [
    qa.QAItem("Mara Ivel was born in", "Lyon", "birth_city"),
    qa.QAItem("Mara Ivel works for", "Calder Labs", "employer"),
    qa.QAItem("Tomas Reid was born in", "Graz", "birth_city"),
    qa.QAItem("Tomas Reid works for", "Norvex", "employer"),
    qa.QAItem("Ana Kel plays the", "double bass", "instrument"),
]


class FakeModel:
  """A causal "LM" over bytes that continues each known prompt with a scripted string.

  It reads each row's prompt (everything left of the first pad after bos), finds the scripted
  continuation and puts all logit mass on its next byte at the row's last filled position.
  """

  def __init__(self, tokenizer, scripts, seq_len, batch_size):
    self.tok, self.scripts = tokenizer, scripts
    self.batch_size, self.seq_len = batch_size, seq_len
    self.calls, self.widths = 0, set()

  def __call__(self, tokens_BxT):
    assert tokens_BxT.shape[0] == self.batch_size and tokens_BxT.dtype == np.int32
    assert tokens_BxT.shape[1] <= self.seq_len
    self.widths.add(tokens_BxT.shape[1])
    assert len(self.widths) == 1  # one shape for every call: jit traces once
    self.calls += 1
    b_size, t_size = tokens_BxT.shape
    logits_BxTxV = np.zeros((b_size, t_size, self.tok.vocab_size), np.float32)
    for b in range(b_size):
      row = tokens_BxT[b]
      assert row[0] == self.tok.bos_id
      n = int(np.count_nonzero(row))
      text = self.tok.decode(row[:n])
      script = next((s for p, s in self.scripts.items() if text.startswith(p)), None)
      if script is None:  # dummy padding rows and unknown prompts: say eos
        logits_BxTxV[b, n - 1, self.tok.eos_id] = 1.0
        continue
      prompt = next(p for p in self.scripts if text.startswith(p))
      done = text[len(prompt):]
      assert script.startswith(done)
      nxt = self.tok.eos_id if len(done) == len(script) else self.tok.encode(script[len(done)])[0]
      logits_BxTxV[b, n - 1, nxt] = 1.0
    return logits_BxTxV


def test_known_answers_give_the_known_score():
  tok = ByteTokenizer()
  scripts = {
      "Mara Ivel was born in": " Lyon. Mara Ivel studied at Yale.",  # right, then keeps going
      "Mara Ivel works for": " Calder Labs\nnext line",  # right, stops at the newline
      "Tomas Reid was born in": " Grazzano",  # wrong: "Graz" is a prefix, not a word
      "Tomas Reid works for": "   Norvex",  # right after whitespace normalisation, then eos
      "Ana Kel plays the": " double  bass!",  # right: spaces collapse, "!" is a boundary
  }
  model = FakeModel(tok, scripts, seq_len=48, batch_size=2)
  out = qa.qa_exact_match(model, ITEMS, tok, batch_size=2, seq_len=48, return_predictions=True)
  assert out["n"] == 5 and out["qa_exact_match"] == pytest.approx(4 / 5)
  assert out["by_attribute"] == {"birth_city": 0.5, "employer": 1.0, "instrument": 1.0}
  assert [p["correct"] for p in out["predictions"]] == [True, True, False, True, True]
  assert out["predictions"][1]["prediction"] == "Calder Labs"
  # max_answer_tokens defaults to the longest " " + answer (12 bytes) + 1, so decoding stops there.
  assert out["predictions"][0]["prediction"] == "Lyon. Mara I"
  assert out["prompts_truncated"] == 0


def test_the_window_is_cut_to_the_longest_prompt_and_answer_without_changing_predictions():
  tok = ByteTokenizer()
  scripts = {"Mara Ivel was born in": " Lyon.", "Tomas Reid works for": " Norvex and more"}
  items = [ITEMS[0], ITEMS[3]]
  wide = FakeModel(tok, scripts, seq_len=128, batch_size=2)
  out_wide = qa.qa_exact_match(wide, items, tok, batch_size=2, seq_len=128, return_predictions=True)
  # bos + the longer prompt (21 bytes) + the answer budget (len(" Norvex") + 1 = 8) = 30 -> 32.
  assert wide.widths == {32}
  assert qa.decode_window([[0] * 21, [0] * 22], 8, 128) == 32
  exact = FakeModel(tok, scripts, seq_len=32, batch_size=2)
  out_exact = qa.qa_exact_match(exact, items, tok, batch_size=2, seq_len=32, return_predictions=True)
  assert out_wide["predictions"] == out_exact["predictions"] and out_wide["qa_exact_match"] == 1.0
  # Never wider than seq_len, even when the prompts and answers would want more.
  assert qa.decode_window([[0] * 40], 8, 32) == 32


def test_a_model_that_knows_nothing_scores_zero_and_stops_early():
  tok = ByteTokenizer()
  model = FakeModel(tok, {}, seq_len=40, batch_size=4)
  out = qa.qa_exact_match(model, ITEMS, tok, batch_size=4, seq_len=40, max_answer_tokens=8)
  assert out["qa_exact_match"] == 0.0
  assert model.calls == 2  # two batches, each done after one step (everyone says eos)


def test_long_prompts_keep_their_last_tokens():
  tok = ByteTokenizer()
  long_prompt = "x" * 60 + " Mara Ivel was born in"
  model = FakeModel(tok, {}, seq_len=32, batch_size=1)
  seen = []

  def spy(tokens_BxT):
    seen.append(tok.decode(tokens_BxT[0]))
    return model(np.where(np.arange(32) == 0, tok.bos_id, tokens_BxT).astype(np.int32))

  out = qa.qa_exact_match(spy, [qa.QAItem(long_prompt, "Lyon")], tok, batch_size=1, seq_len=32,
                          max_answer_tokens=6)
  assert out["prompts_truncated"] == 1
  assert seen[0].endswith("was born in") and len(seen[0]) == 32 - 6


def test_items_as_mappings_and_answer_matching_rules():
  tok = ByteTokenizer()
  model = FakeModel(tok, {"Q": " A1"}, seq_len=16, batch_size=1)
  out = qa.qa_exact_match(model, [{"prompt": "Q", "answer": "A1"}], tok, batch_size=1, seq_len=16)
  assert out["qa_exact_match"] == 1.0 and "by_attribute" not in out
  assert qa.answer_matches(" Lyon", "Lyon") and qa.answer_matches("Lyon, where", "Lyon")
  assert not qa.answer_matches(" Lyons", "Lyon") and not qa.answer_matches(" Ly", "Lyon")
  assert not qa.answer_matches("\nLyon", "Lyon")  # a newline before the answer stops decoding
  assert qa.answer_matches("  New \t York\n", "New York")


def test_read_qa_jsonl(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text('{"prompt": "Köln is in", "answer": "Germany", "attribute": "country"}\n\n'
                  '{"prompt": "2+2 =", "answer": "4", "extra": 1}\n')
  items = qa.read_qa_jsonl(path)
  assert items == [qa.QAItem("Köln is in", "Germany", "country"), qa.QAItem("2+2 =", "4", "")]


def test_load_qa_items_from_the_knowledge_base(tmp_path):
  items = qa.load_qa_items(tmp_path, "tiny")
  assert len(items) == 120 and len({i.prompt for i in items}) == 120
  assert {i.attribute for i in items} == {"birth_date", "birth_city", "university", "employer", "field",
                                          "instrument"}
