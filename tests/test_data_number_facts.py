"""Numeric facts: numbers of exactly their width drawn uniformly, every fact asked once and trained in
every phrasing, the question halves never leak, the bit budget is the formula's, data.kb selects it."""

import collections
import math

import numpy as np
import pytest

from helpers import split_record_hash
from memjax.config import ConfigError, DataConfig, NUMBER_SIZES
from memjax.data import knowledge as kb
from memjax.data import number_facts as nf
from memjax.data.errors import DataError

WIDTHS = {"badge": 5, "room": 4, "phone": 6, "postcode": 5, "locker": 3, "pin": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("numbers"))


@pytest.fixture(scope="module")
def tiny(data_dir):
  return nf.prepare_number_facts(data_dir, "numbers_tiny", 0)


@pytest.fixture(scope="module")
def people():
  return nf.number_entities(NUMBER_SIZES["numbers_tiny"][0], 0)


def test_numbers_have_their_width_and_are_uniform():
  assert {a.name: a.values.width for a in nf.NUMBER_ATTRIBUTES} == WIDTHS
  many = nf.number_entities(3000, 0)
  for j, name in enumerate(nf.NUMBER_ATTRIBUTE_NAMES):
    values = [e.facts[j] for e in many]
    assert all(len(v) == WIDTHS[name] and v.isdigit() for v in values)
    # Uniform digits: the leading digit (zero padded) is 0-9 about equally often (chi-square, 9 dof,
    # p = 0.001 at 27.9).
    counts = np.bincount([int(v[0]) for v in values], minlength=10)
    expected = len(values) / 10
    assert ((counts - expected) ** 2 / expected).sum() < 27.9, (name, counts)
  assert len({e.name for e in many}) == len(many)
  assert [e.facts for e in nf.number_entities(50, 0)] != [e.facts for e in nf.number_entities(50, 1)]


def test_digit_strings_index_like_a_list():
  d = nf.DigitStrings(2)
  assert len(d) == 100 and list(d) == [f"{i:02d}" for i in range(100)]
  assert d[-1] == "99" and d[3:6] == ["03", "04", "05"]
  with pytest.raises(IndexError):
    d[100]
  assert d == nf.DigitStrings(2) != nf.DigitStrings(3)


def test_bit_budget_is_log2_of_ten_per_digit(tiny, people, data_dir):
  from memjax.data.qa import load_qa_items
  from memjax.metrics import bits_stored

  facts, values = kb.attribute_bit_budget(load_qa_items(data_dir, "numbers_tiny", 0),
                                          kb.kb_attributes("numbers_tiny"))
  assert facts == {a: len(people) for a in WIDTHS}
  assert values == {a: 10 ** w for a, w in WIDTHS.items()}
  per_person = sum(WIDTHS.values()) * math.log2(10)
  assert per_person == pytest.approx(89.69, abs=0.01)
  everything = bits_stored({a: 1.0 for a in WIDTHS}, facts, values)["bits"]
  assert everything == pytest.approx(len(people) * per_person)
  assert bits_stored({**{a: 0.0 for a in WIDTHS}, "phone": 0.5}, facts, values)["bits"] == pytest.approx(
      0.5 * len(people) * 6 * math.log2(10))
  assert kb.kb_attributes("numbers_small") is nf.NUMBER_ATTRIBUTES


def test_qa_split_asks_every_fact_exactly_once(tiny, people):
  source = tiny.as_data_source("qa")
  asked = collections.Counter()
  for i in range(len(source)):
    r = source[i]
    e, attribute, answer = people[int(r["entity"])], r["attribute"].decode(), r["answer"].decode()
    asked[e.index, attribute] += 1
    assert answer == e.fact(attribute) and len(answer) == WIDTHS[attribute]
    attr = nf.NUMBER_ATTRIBUTES[nf.NUMBER_ATTRIBUTE_NAMES.index(attribute)]
    assert attr.sentence(0, e.name, answer) == f"{r['prompt'].decode()} {answer}."
  assert set(asked) == {(e.index, a) for e in people for a in WIDTHS} and set(asked.values()) == {1}


def test_train_has_every_fact_in_every_phrasing(tiny, people):
  splits = {s: info.num_examples for s, info in tiny.info.splits.items()}
  assert splits["train"] == len(people) * NUMBER_SIZES["numbers_tiny"][1] and splits["validation"] == len(people)
  source = tiny.as_data_source("train")
  docs = collections.defaultdict(list)
  for i in range(len(source)):
    docs[int(source[i]["entity"])].append(source[i]["text"].decode())
  for e in people:
    for a, attr in enumerate(nf.NUMBER_ATTRIBUTES):
      for t in range(kb.NUM_TEMPLATES):
        assert any(attr.sentence(t, e.name, e.facts[a]) in d for d in docs[e.index]), (e.name, attr.name, t)


def test_question_halves_never_leak(tiny, people):
  questions = tiny.as_data_source("qa_question")
  asked = {(people[int(questions[i]["entity"])].index, questions[i]["attribute"].decode())
           for i in range(len(questions))}
  assert asked == {(e.index, a) for e in people if kb.question_half(e.index) == "eval" for a in WIDTHS}
  trained = tiny.as_data_source("train_questions")
  corpus = "\n".join(trained[i]["text"].decode() for i in range(len(trained)))
  assert {int(trained[i]["entity"]) for i in range(len(trained))} == {e.index for e in people if e.index % 2 == 0}
  for i in range(len(questions)):
    prompt = questions[i]["prompt"].decode()
    assert prompt.startswith("Q: What is ") and prompt.endswith("? A:") and prompt not in corpus


def test_builds_are_deterministic_and_seeded(tiny, tmp_path):
  again = nf.prepare_number_facts(tmp_path / "again", "numbers_tiny", 0)
  other = nf.prepare_number_facts(tmp_path / "other", "numbers_tiny", 2)
  assert other.builder_config.name == "numbers_tiny_seed2"
  for split in ("train", "validation", "qa", "train_questions", "qa_question"):
    assert split_record_hash(tiny, split) == split_record_hash(again, split), split
    assert split_record_hash(tiny, split) != split_record_hash(other, split), split


def test_bad_names_are_rejected_naming_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"DataConfig.kb='numbers_huge' is not a knowledge-base size; allowed: "
                                        r"\[.*'numbers_tiny', 'numbers_small', 'numbers_medium', 'numbers_large'\]"):
    DataConfig(kb="numbers_huge")
  for name in NUMBER_SIZES:
    assert DataConfig(kb=name).kb == name
  with pytest.raises(DataError, match=r"kb='small' is not a numeric-facts preset; allowed: \['numbers_tiny'"):
    nf.number_builder_config("small")
  with pytest.raises(DataError, match="seed=-1"):
    nf.number_builder_config("numbers_small", seed=-1)
  with pytest.raises(DataError, match="num_entities=0"):
    nf.number_entities(0, 0)
  with pytest.raises(DataError, match=r"attribute='birth_city' is not a numeric attribute; allowed: \['badge'"):
    nf.number_entities(1, 0)[0].fact("birth_city")
  with pytest.raises(DataError, match=r"kb='numbers' .*allowed: \[.*'numbers_tiny'"):
    kb.kb_attributes("numbers")
  assert isinstance(kb.prepare_kb(tmp_path, "numbers_tiny"), nf.MemjaxNumberFacts)


def test_data_kb_selects_number_facts_through_the_pipeline(tiny, people, data_dir):
  from memjax.data import make_pipeline

  pipe = make_pipeline(seq_len=64, batch_size=4, kb="numbers_tiny", kb_questions=True, data_dir=data_dir,
                       process_index=0, process_count=1)
  assert pipe.source == "memjax_number_facts/numbers_tiny"
  batch = next(pipe.train)
  assert batch["inputs"].shape == (4, 64) and batch["loss_mask"].sum() > 0
  assert len(pipe.qa_items) == len(people) * len(WIDTHS)
  assert len(pipe.qa_question_items) == (len(people) // 2) * len(WIDTHS)
  text = pipe.tokenizer.decode(batch["inputs"][0][batch["segment_ids"][0] > 0].tolist())
  assert any(e.name in text for e in people)
