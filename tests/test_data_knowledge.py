"""The synthetic knowledge base: deterministic, every fact asked once, every phrasing trained."""

import collections
import re

import pytest

from helpers import split_record_hash
from memjax.data import knowledge as kb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return kb.prepare_knowledge(tmp_path_factory.mktemp("kb"), "tiny", 0)


def test_generation_is_deterministic_and_seeded(tiny, tmp_path):
  again = kb.prepare_knowledge(tmp_path / "again", "tiny", 0)  # a fresh build in another directory
  other = kb.prepare_knowledge(tmp_path / "other", "tiny", 1)
  assert other.builder_config.name == "tiny_seed1"
  for split in ("train", "validation", "qa", "train_questions", "qa_question"):
    assert split_record_hash(tiny, split) == split_record_hash(again, split), split
    assert split_record_hash(tiny, split) != split_record_hash(other, split), split


def test_sizes_and_splits(tiny):
  e, bios = kb.KB_SIZES["tiny"]
  a = len(kb.ATTRIBUTES)
  assert a >= 5
  splits = {s: info.num_examples for s, info in tiny.info.splits.items()}
  assert splits == {"train": e * bios, "validation": e, "qa": e * a, "train_questions": e // 2,
                    "qa_question": (e // 2) * a}
  assert kb.KB_SIZES["large"][0] >= 100_000
  assert 200 <= kb.KB_SIZES["small"][0] <= 500


def test_qa_split_asks_every_fact_exactly_once(tiny):
  e, _ = kb.KB_SIZES["tiny"]
  people = kb.make_entities(e, 0)
  source = tiny.as_data_source("qa")
  asked = collections.Counter()
  for i in range(len(source)):
    r = source[i]
    person, attribute = people[int(r["entity"])], r["attribute"].decode()
    asked[person.index, attribute] += 1
    assert r["answer"].decode() == person.fact(attribute)
    prompt = r["prompt"].decode()
    assert prompt.startswith(person.name)
    # The prompt ends right before the answer: template 0 with the value cut off.
    attr = kb.ATTRIBUTES[kb.ATTRIBUTE_NAMES.index(attribute)]
    assert attr.sentence(0, person.name, r["answer"].decode()) == f"{prompt} {r['answer'].decode()}."
  assert set(asked) == {(p.index, a) for p in people for a in kb.ATTRIBUTE_NAMES}
  assert set(asked.values()) == {1}


def test_question_form_splits_the_people_in_halves_and_never_trains_the_asked_half(tiny):
  e, _ = kb.KB_SIZES["tiny"]
  people = kb.make_entities(e, 0)
  questions = tiny.as_data_source("qa_question")
  asked = collections.Counter()
  for i in range(len(questions)):
    r = questions[i]
    person, attribute = people[int(r["entity"])], r["attribute"].decode()
    assert person.index % 2 == 1 and r["answer"].decode() == person.fact(attribute)
    prompt = r["prompt"].decode()
    assert prompt.startswith("Q: ") and prompt.endswith(" A:") and person.name in prompt
    asked[person.index, attribute] += 1
  assert set(asked) == {(p.index, a) for p in people if p.index % 2 == 1 for a in kb.ATTRIBUTE_NAMES}
  assert set(asked.values()) == {1}
  docs = tiny.as_data_source("train_questions")
  trained = [docs[i]["text"].decode() for i in range(len(docs))]
  assert sorted(int(docs[i]["entity"]) for i in range(len(docs))) == list(range(0, e, 2))
  for text, person in zip(trained, (people[int(docs[i]["entity"])] for i in range(len(docs)))):
    lines = text.splitlines()
    assert len(lines) == len(kb.ATTRIBUTES)
    for line, a in zip(lines, kb.ATTRIBUTES):
      assert line == f"{a.ask(person.name)} {person.fact(a.name)}"
  # The question form of the scored half appears nowhere in the training text (bios nor questions).
  train = tiny.as_data_source("train")
  corpus = "\n".join([train[i]["text"].decode() for i in range(len(train))] + trained)
  for i in range(len(questions)):
    assert questions[i]["prompt"].decode() not in corpus
  assert "Q: " not in "\n".join(train[i]["text"].decode() for i in range(len(train)))


def test_train_has_every_fact_in_every_phrasing(tiny):
  e, bios = kb.KB_SIZES["tiny"]
  assert bios == kb.NUM_TEMPLATES
  people = kb.make_entities(e, 0)
  source = tiny.as_data_source("train")
  texts_by_person = collections.defaultdict(list)
  for i in range(len(source)):
    texts_by_person[int(source[i]["entity"])].append(source[i]["text"].decode())
  for p in people:
    docs = texts_by_person[p.index]
    assert len(docs) == bios
    for a, attr in enumerate(kb.ATTRIBUTES):
      for t in range(kb.NUM_TEMPLATES):
        sentence = attr.sentence(t, p.name, p.facts[a])
        assert sum(sentence in d for d in docs) >= 1, sentence
    for d in docs:  # one sentence per attribute, nothing else
      assert len(re.findall(re.escape(p.name), d)) == len(kb.ATTRIBUTES)


def test_names_are_unique_at_scale_and_values_come_from_the_lists():
  names = kb.make_names(20_000, seed=3)
  assert len(set(names)) == 20_000
  assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in names[:500])
  people = kb.make_entities(300, seed=3)
  for a, attr in enumerate(kb.ATTRIBUTES):
    values = {p.facts[a] for p in people}
    assert values <= set(attr.values) and len(values) > 1


def test_bad_knowledge_configs_name_the_field():
  with pytest.raises(ValueError, match=r"kb='huge' .*allowed: \['tiny', 'small', 'medium', 'large'\]") as err:
    kb.knowledge_builder_config("huge")
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="seed=-1"):
    kb.knowledge_builder_config("tiny", seed=-1)
