"""A synthetic knowledge base: people, their facts, paraphrased biographies and QA pairs.

Memory layers exist to store facts; this dataset is nothing but facts. A seeded world of ``E``
people with unique syllable names, each with ``A = 6`` attributes drawn uniformly from fixed lists
(``ATTRIBUTES``), is written out three ways:

* ``train``: ``bios_per_entity`` biographies per person, one document each. A biography is one
  sentence per attribute, in a random order, each from one of 4 paraphrase templates. Biography
  ``b`` of person ``e`` uses template ``(b + offset[e, a]) % 4`` for attribute ``a``, so with 4
  biographies per person every fact appears once in each of its 4 phrasings: a model has to learn
  the fact, not one string, and the QA phrasing (template 0) is always among them.
* ``validation``: one more biography per person with random templates and order (held-out
  combinations of the same facts; its loss measures how well the facts are known).
* ``qa``: every fact exactly once, ``{"prompt": "Mara Ivel was born in", "answer": "Lyon"}``:
  the prompt is template 0 cut right before the value, the answer the value itself (short).

Everything is a pure function of ``(num_entities, bios_per_entity, seed)``; the TFDS builder
``MemjaxKnowledge`` (``file_format="array_record"``, no TensorFlow) writes it with configs by size:

  ========  ==========  ==============  ==============================================
  config    entities    train records   use
  ========  ==========  ==============  ==============================================
  tiny      20          80              tests (120 facts)
  small     200         800             the default run: 1,200 facts, 0.2 MB of text
  medium    5,000       20,000          30,000 facts, 5 MB
  large     100,000     400,000         600,000 facts, 106 MB (builds in minutes)
  ========  ==========  ==============  ==============================================

A biography is 264 bytes on average (at most ~340), so with the byte tokenizer ``seq_len >= 384``
keeps every biography in one segment (``seq_len=256`` packs fuller but cuts most in two); with
BPE (1024 pieces) a biography is ~89 tokens (at most ~112) and ``seq_len=128`` is enough.

``knowledge_builder_config(size, seed)`` names a seeded variant ``"{size}"`` (seed 0) or
``"{size}_seed{seed}"``, so differently seeded worlds never share a directory.

Example:
  >>> people = make_entities(3, seed=0)
  >>> [p.name for p in people] == [p.name for p in make_entities(3, seed=0)]
  True
  >>> item = qa_pairs(people)[1]
  >>> item["prompt"] == f"{people[0].name} was born in", item["attribute"]
  (True, 'birth_city')
  >>> item["answer"] == people[0].fact("birth_city")
  True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from memjax.data._tfds import code_path_of, quiet_prepare
from memjax.config import KB_SIZES
from memjax.data.errors import DataError

# ----- the world's vocabulary ----------------------------------------------------------------

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "s")
SYLLABLES = tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS)

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_BIRTH_DATES = tuple(f"{d} {m} {y}" for y in range(1940, 2005) for m in _MONTHS for d in range(1, 29))
_CITIES = (
    "Lyon", "Porto", "Krakow", "Seville", "Utrecht", "Bergen", "Tampere", "Graz", "Trieste", "Bruges",
    "Ghent", "Leipzig", "Dresden", "Valencia", "Bilbao", "Gdansk", "Riga", "Tallinn", "Vilnius",
    "Ljubljana", "Zagreb", "Brno", "Salzburg", "Basel", "Geneva", "Nantes", "Bordeaux", "Marseille",
    "Naples", "Palermo", "Turin", "Florence", "Malaga", "Coimbra", "Aarhus", "Malmo", "Turku", "Oslo",
    "Cork", "Galway", "Leeds", "Bristol", "Glasgow", "Cardiff", "Quebec", "Osaka", "Busan", "Hanoi",
    "Lima", "Quito", "Cusco", "Recife", "Tucson", "Denver", "Austin", "Perth")
_UNIVERSITIES = (
    "Oxford", "Cambridge", "Yale", "Princeton", "Stanford", "Harvard", "MIT", "Caltech", "ETH Zurich",
    "EPFL", "Leiden University", "Heidelberg University", "KU Leuven", "McGill", "Columbia", "Cornell",
    "Duke", "UCLA", "Berkeley", "Tsinghua", "Kyoto University", "TU Delft", "TU Munich",
    "Imperial College", "Karolinska", "Sciences Po", "Bocconi", "Waseda", "Monash", "Sorbonne")
_EMPLOYERS = (
    "Norvex", "Calder Labs", "Brightwell", "Quillon", "Arktura", "Vantor Systems", "Helix Forge",
    "Meridian Bank", "Solvane", "Corvid Energy", "Tessaro", "Lumen Works", "Ostrava Motors", "Pellucid",
    "Kestrel Air", "Bluefen", "Ironleaf", "Nimbra", "Zephyr Foods", "Granite Health", "Orbis Media",
    "Sable Robotics", "Vireo Pharma", "Cobalt Rail", "Fenwick Press", "Astral Mills", "Juniper Telecom",
    "Marlow Shipping", "Redcliff Mining", "Silverline Games", "Trellis Software", "Umbra Optics",
    "Wexford Insurance", "Yarrow Textiles", "Zenith Chemicals")
_FIELDS = (
    "physics", "chemistry", "marine biology", "economics", "linguistics", "mathematics", "astronomy",
    "geology", "neuroscience", "architecture", "philosophy", "sociology", "botany", "genetics",
    "statistics", "robotics", "cryptography", "archaeology", "anthropology", "climatology",
    "epidemiology", "materials science", "number theory", "music theory", "art history",
    "political science", "oceanography", "ecology", "virology")
_INSTRUMENTS = (
    "piano", "violin", "cello", "flute", "clarinet", "oboe", "trumpet", "trombone", "harp", "guitar",
    "banjo", "accordion", "saxophone", "drums", "viola", "bassoon", "ukulele", "mandolin", "harmonica",
    "double bass", "French horn", "sitar", "bagpipes", "organ")


@dataclasses.dataclass(frozen=True)
class Attribute:
  """One kind of fact: its possible values and its paraphrase templates.

  ``templates[0]`` must end with ``"{value}."``: cut before ``{value}`` it is the QA prompt.
  ``question`` is the question form ("Q: ... A:"), never used by a biography.
  """

  name: str
  values: tuple[str, ...]
  templates: tuple[str, ...]
  question: str = ""

  def __post_init__(self):
    if not self.templates[0].endswith("{value}."):
      raise ValueError(f"Attribute({self.name!r}).templates[0]={self.templates[0]!r} must end with '{{value}}.'")

  def prompt(self, name: str) -> str:
    """The QA prompt for a person: template 0 cut right before the value."""
    return self.templates[0].split("{value}")[0].format(name=name).rstrip()

  def sentence(self, template: int, name: str, value: str) -> str:
    return self.templates[template].format(name=name, value=value)

  def ask(self, name: str) -> str:
    """The question form for a person, ending with ``"A:"`` (the answer follows after a space)."""
    return self.question.format(name=name)


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("birth_date", _BIRTH_DATES, (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The birth date of {name} is {value}.",
        "On {value}, {name} was born."),
        "Q: When was {name} born? A:"),
    Attribute("birth_city", _CITIES, (
        "{name} was born in {value}.",
        "{name}'s birthplace is {value}.",
        "{name} is a native of {value}.",
        "The city where {name} was born is {value}."),
        "Q: In which city was {name} born? A:"),
    Attribute("university", _UNIVERSITIES, (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} earned a degree at {value}.",
        "{name} attended {value} as a student."),
        "Q: Which university did {name} attend? A:"),
    Attribute("employer", _EMPLOYERS, (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{value} is the employer of {name}."),
        "Q: Which company does {name} work for? A:"),
    Attribute("field", _FIELDS, (
        "{name} works in the field of {value}.",
        "{name} specializes in {value}.",
        "{name}'s area of expertise is {value}.",
        "{name} has a career in {value}."),
        "Q: What is the field of {name}? A:"),
    Attribute("instrument", _INSTRUMENTS, (
        "{name} plays the {value}.",
        "{name} took lessons on the {value}.",
        "In spare time, {name} practises the {value}.",
        "The instrument {name} plays is the {value}."),
        "Q: Which instrument does {name} play? A:"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
NUM_TEMPLATES = 4
assert all(len(a.templates) == NUM_TEMPLATES and a.question.endswith("A:") for a in ATTRIBUTES)

# Independent random streams of one seed.
_STREAM_NAMES, _STREAM_FACTS, _STREAM_TRAIN, _STREAM_VALIDATION = 1, 2, 3, 4


# ----- pure generation -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entity:
  """A person: a unique name and one value per attribute (aligned with ``ATTRIBUTES``)."""

  index: int
  name: str
  facts: tuple[str, ...]

  def fact(self, attribute: str) -> str:
    return self.facts[ATTRIBUTE_NAMES.index(attribute)]


def _check_seed(seed: int) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise DataError(f"seed={seed!r} must be an int in [0, 2**32)")


def make_names(count: int, seed: int) -> list[str]:
  """``count`` distinct names "First Last" from ``SYLLABLES`` (first: 2 syllables, last: 2, or 3 in 1/4).

  Example:
    >>> make_names(2, seed=0) == make_names(2, seed=0), len(set(make_names(500, seed=1)))
    (True, 500)
  """
  _check_seed(seed)
  rng = np.random.default_rng([seed, _STREAM_NAMES])
  names: dict[str, None] = {}  # insertion-ordered set
  syl = SYLLABLES
  while len(names) < count:
    need = count - len(names)
    draw_Nx5 = rng.integers(len(syl), size=(need + 16, 5))
    three_N = rng.random(need + 16) < 0.25
    for row, three in zip(draw_Nx5.tolist(), three_N.tolist()):
      first = (syl[row[0]] + syl[row[1]]).capitalize()
      last = (syl[row[2]] + syl[row[3]] + (syl[row[4]] if three else "")).capitalize()
      names.setdefault(f"{first} {last}")
      if len(names) == count:
        break
  return list(names)


def make_entities(num_entities: int, seed: int) -> list[Entity]:
  """The world: ``num_entities`` people, each attribute value drawn uniformly from its list."""
  if isinstance(num_entities, bool) or not isinstance(num_entities, int) or num_entities <= 0:
    raise DataError(f"num_entities={num_entities!r} must be a positive int")
  names = make_names(num_entities, seed)
  rng = np.random.default_rng([seed, _STREAM_FACTS])
  value_ids_AxE = [rng.integers(len(a.values), size=num_entities) for a in ATTRIBUTES]
  return [
      Entity(e, names[e], tuple(a.values[int(ids_E[e])] for a, ids_E in zip(ATTRIBUTES, value_ids_AxE)))
      for e in range(num_entities)
  ]


def biography(entity: Entity, templates_A: Sequence[int], order_A: Sequence[int],
              attributes: Sequence[Attribute] = ATTRIBUTES) -> str:
  """One sentence per attribute, attribute ``order_A[i]`` i-th, with the chosen templates.

  ``attributes`` are those ``entity.facts`` is aligned with; a fact that is ``""`` (the entity has
  no such attribute, as in ``memjax.data.world_facts``) gives no sentence.
  """
  return " ".join(
      attributes[a].sentence(int(templates_A[a]), entity.name, entity.facts[a]) for a in order_A
      if entity.facts[a])


def biographies(entities: Sequence[Entity], bios_per_entity: int, seed: int, *,
                split: str = "train", attributes: Sequence[Attribute] = ATTRIBUTES
                ) -> Iterator[tuple[int, int, str]]:
  """Yields ``(entity index, biography index, text)``.

  ``split="train"``: biography ``b`` uses template ``(b + offset[e, a]) % NUM_TEMPLATES`` for
  attribute ``a`` (each phrasing of each fact once per ``NUM_TEMPLATES`` biographies).
  ``split="validation"``: templates drawn at random. The sentence order is random in both.
  ``attributes``: what the entities' facts are aligned with (each with ``NUM_TEMPLATES`` templates;
  ``""`` facts are skipped); the synthetic ones by default.
  """
  _check_seed(seed)
  if any(len(a.templates) != NUM_TEMPLATES for a in attributes):
    raise DataError(f"every attribute needs {NUM_TEMPLATES} templates, got "
                    f"{ {a.name: len(a.templates) for a in attributes} }")
  n_e, n_a = len(entities), len(attributes)
  if split == "train":
    rng = np.random.default_rng([seed, _STREAM_TRAIN])
    offset_ExA = rng.integers(NUM_TEMPLATES, size=(n_e, n_a))
    bio_B = np.arange(bios_per_entity)
    templates_ExBxA = (bio_B[None, :, None] + offset_ExA[:, None, :]) % NUM_TEMPLATES
  elif split == "validation":
    rng = np.random.default_rng([seed, _STREAM_VALIDATION])
    templates_ExBxA = rng.integers(NUM_TEMPLATES, size=(n_e, bios_per_entity, n_a))
  else:
    raise DataError(f"split={split!r} is not a biography split; allowed: 'train', 'validation'")
  order_ExBxA = np.argsort(rng.random((n_e, bios_per_entity, n_a)), axis=-1)
  templates, orders = templates_ExBxA.tolist(), order_ExBxA.tolist()
  for e, entity in enumerate(entities):
    for b in range(bios_per_entity):
      yield e, b, biography(entity, templates[e][b], orders[e][b], attributes)


def qa_pairs(entities: Sequence[Entity], attributes: Sequence[Attribute] = ATTRIBUTES) -> list[dict]:
  """Every fact once: ``{"prompt", "answer", "attribute", "entity"}``, by entity then attribute
  (``""`` facts skipped; ``attributes`` as in ``biographies``)."""
  return [
      {"prompt": a.prompt(ent.name), "answer": ent.facts[i], "attribute": a.name, "entity": ent.index}
      for ent in entities for i, a in enumerate(attributes) if ent.facts[i]
  ]


def attribute_bit_budget(items, attributes: Sequence[Attribute] = ATTRIBUTES) -> tuple[dict, dict]:
  """``(facts_by_attribute, values_by_attribute)`` of a knowledge base's QA items (dicts or ``QAItem``s
  with ``attribute`` and ``answer``), for ``memjax.metrics.bits_stored``: the number of facts of each
  attribute, and the number of values it can take: the attribute's value list where it has one
  (the synthetic base: birth dates 21,840 = 14.4 bits, cities 57, ...), else the distinct answers
  that occur (real-world facts, whose values are not drawn from a list).

  Example:
    >>> facts, values = attribute_bit_budget(qa_pairs(make_entities(3, seed=0)))
    >>> facts["birth_city"], values["birth_city"] == len(_CITIES)
    (3, True)
  """
  get = lambda it, key: it[key] if isinstance(it, dict) else getattr(it, key)
  lists = {a.name: a.values for a in attributes}
  facts, answers = {}, {}
  for it in items:
    name = get(it, "attribute")
    facts[name] = facts.get(name, 0) + 1
    answers.setdefault(name, set()).add(get(it, "answer"))
  values = {name: len(lists[name]) if lists.get(name) else len(answers[name]) for name in facts}
  return facts, values


def question_half(entity_index: int) -> str:
  """Which half of the people a person's question-form QA pairs belong to: ``"train"`` (even index:
  mixed into the training text with ``data.kb_questions``) or ``"eval"`` (odd: scored only)."""
  return "train" if entity_index % 2 == 0 else "eval"


def question_pairs(entities: Sequence[Entity], half: str,
                   attributes: Sequence[Attribute] = ATTRIBUTES) -> list[dict]:
  """The question form of every fact of one half of the people (``question_half``):
  ``{"prompt": "Q: Which company does X work for? A:", "answer", "attribute", "entity"}``
  (``""`` facts skipped; ``attributes`` as in ``biographies``).

  Example:
    >>> people = make_entities(2, seed=0)
    >>> item = question_pairs(people, "eval")[3]
    >>> item["prompt"] == f"Q: Which company does {people[1].name} work for? A:", item["answer"] == people[1].fact("employer")
    (True, True)
  """
  if half not in ("train", "eval"):
    raise DataError(f"half={half!r}: allowed 'train', 'eval'")
  return [
      {"prompt": a.ask(ent.name), "answer": ent.facts[i], "attribute": a.name, "entity": ent.index}
      for ent in entities if question_half(ent.index) == half for i, a in enumerate(attributes)
      if ent.facts[i]
  ]


def question_document(items: Sequence[dict]) -> str:
  """One training document of question-form QA pairs, one ``"Q: ... A: value"`` line each."""
  return "\n".join(f"{it['prompt']} {it['answer']}" for it in items)


# ----- the TFDS builder ----------------------------------------------------------------------

_SUMMARY = __doc__.split("\n\n")[0]  # the builders' DatasetInfo description


@dataclasses.dataclass(eq=False)
class KnowledgeConfig(tfds.core.BuilderConfig):
  """A size and seed of the knowledge base (TFDS ``BuilderConfig``; not frozen because TFDS's is not)."""

  num_entities: int = 20
  bios_per_entity: int = 4
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.num_entities, bool) or not isinstance(self.num_entities, int) or self.num_entities <= 0:
      raise DataError(f"KnowledgeConfig.num_entities={self.num_entities!r} must be a positive int")
    if (isinstance(self.bios_per_entity, bool) or not isinstance(self.bios_per_entity, int)
        or self.bios_per_entity <= 0):
      raise DataError(f"KnowledgeConfig.bios_per_entity={self.bios_per_entity!r} must be a positive int")
    _check_seed(self.seed)


def knowledge_builder_config(size: str, seed: int = 0) -> KnowledgeConfig:
  """The config for a size in ``KB_SIZES`` and a seed; named ``size`` or ``f"{size}_seed{seed}"``."""
  if size not in KB_SIZES:
    raise DataError(f"kb={size!r} is not a knowledge-base size; allowed: {list(KB_SIZES)}")
  _check_seed(seed)
  entities, bios = KB_SIZES[size]
  name = size if seed == 0 else f"{size}_seed{seed}"
  return KnowledgeConfig(name=name, num_entities=entities, bios_per_entity=bios, seed=int(seed),
                         description=f"{entities} people x {len(ATTRIBUTES)} facts, seed {seed}")


class MemjaxKnowledge(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the synthetic knowledge base (splits ``train``, ``validation``, ``qa``, and the
  question form: ``train_questions``, one document per person of the ``"train"`` half with its
  question-form QA pairs, and ``qa_question``, the question-form items of the ``"eval"`` half).

  Every record has the same features (TFDS needs one schema for all splits):
  ``text`` (biography; "" in ``qa``), ``prompt`` / ``answer`` / ``attribute`` (QA; "" in the
  biography splits) and ``entity`` (int32 person index).

  Subclasses (``memjax.data.world_facts.MemjaxWorldFacts``) write other entities through the same
  splits by overriding ``attributes`` (what entities' facts are aligned with), ``make_entities`` and
  ``description``.
  """

  VERSION = tfds.core.Version("1.1.0")
  code_path = code_path_of(__file__)  # see memjax.data._tfds
  RELEASE_NOTES = {"1.0.0": "First release: 6 attributes, 4 templates each.",
                   "1.1.0": "Question-form splits train_questions and qa_question (other splits unchanged)."}
  BUILDER_CONFIGS = [knowledge_builder_config(size) for size in KB_SIZES]
  DEFAULT_CONFIG_NAME = "small"
  attributes: tuple[Attribute, ...] = ATTRIBUTES
  description: str = _SUMMARY

  def make_entities(self) -> list[Entity]:
    """The entities of ``self.builder_config``."""
    cfg = self.builder_config
    return make_entities(cfg.num_entities, cfg.seed)

  def _info(self) -> tfds.core.DatasetInfo:
    # `self.dataset_info_from_configs()` works here (in a package it reads README.md / CITATIONS.bib
    # / TAGS.txt beside the module: none) but fails in a lone script (NotADirectoryError). Building
    # DatasetInfo directly works in both, and a file added beside this module can't change it.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.description,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "attribute": tfds.features.Text(),
            "entity": tfds.features.Scalar(dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is generated.
    entities = self.make_entities()
    return {
        "train": self._generate_examples(entities=entities, split="train"),
        "validation": self._generate_examples(entities=entities, split="validation"),
        "qa": self._generate_examples(entities=entities, split="qa"),
        "train_questions": self._generate_examples(entities=entities, split="train_questions"),
        "qa_question": self._generate_examples(entities=entities, split="qa_question"),
    }

  def _generate_examples(self, entities, split):
    cfg, attributes = self.builder_config, self.attributes
    if split == "qa":
      for i, item in enumerate(qa_pairs(entities, attributes)):
        yield f"qa-{i:09d}", {"text": "", **item}
      return
    if split == "qa_question":
      for i, item in enumerate(question_pairs(entities, "eval", attributes)):
        yield f"qa_question-{i:09d}", {"text": "", **item}
      return
    if split == "train_questions":
      for ent in entities:
        if question_half(ent.index) == "train":
          text = question_document(question_pairs([ent], "train", attributes))
          yield f"train_questions-{ent.index:09d}", {"text": text, "prompt": "", "answer": "", "attribute": "",
                                                     "entity": ent.index}
      return
    bios = cfg.bios_per_entity if split == "train" else 1
    for e, b, text in biographies(entities, bios, cfg.seed, split=split, attributes=attributes):
      yield f"{split}-{e:09d}-{b:03d}", {"text": text, "prompt": "", "answer": "", "attribute": "",
                                         "entity": entities[e].index}


def prepare_knowledge(data_dir: str | os.PathLike, size: str = "small", seed: int = 0) -> MemjaxKnowledge:
  """Builds (once) and returns the knowledge-base builder; read splits with ``.as_data_source``."""
  cfg = knowledge_builder_config(size, seed)
  # TFDS refuses a config object named like a registered one: pass registered configs by name.
  config = cfg.name if cfg.name in MemjaxKnowledge.builder_configs else cfg
  builder = MemjaxKnowledge(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  quiet_prepare(builder)
  return builder



def prepare_kb(data_dir: str | os.PathLike, kb: str = "small", seed: int = 0) -> MemjaxKnowledge:
  """The builder of any ``data.kb`` value (built once): a synthetic size of ``KB_SIZES``
  (``prepare_knowledge``), a real-world preset of ``WORLD_SIZES``
  (``memjax.data.world_facts.prepare_world_facts``) or a numeric preset of ``NUMBER_SIZES``
  (``memjax.data.number_facts.prepare_number_facts``). All have the same splits and features.

  Example:
    >>> prepare_kb("/tmp/data", "world_countries").name                  # doctest: +SKIP
    'memjax_world_facts'
  """
  from memjax.config import KB_NAMES, NUMBER_SIZES, WORLD_SIZES

  if kb in NUMBER_SIZES:
    from memjax.data.number_facts import prepare_number_facts
    return prepare_number_facts(data_dir, kb, seed)
  if kb in WORLD_SIZES:
    from memjax.data.world_facts import prepare_world_facts
    return prepare_world_facts(data_dir, kb, seed)
  if kb not in KB_SIZES:
    raise DataError(f"kb={kb!r} is not a knowledge-base size; allowed: {list(KB_NAMES)}")
  return prepare_knowledge(data_dir, kb, seed)


def kb_attributes(kb: str) -> tuple[Attribute, ...]:
  """The attributes (names, value lists, templates, question forms) of any ``data.kb`` value: the
  synthetic ``ATTRIBUTES``, ``world_facts.WORLD_ATTRIBUTES`` or ``number_facts.NUMBER_ATTRIBUTES``.

  Example:
    >>> [a.name for a in kb_attributes("numbers_tiny")][:2]
    ['badge', 'room']
  """
  from memjax.config import KB_NAMES, NUMBER_SIZES, WORLD_SIZES

  if kb in NUMBER_SIZES:
    from memjax.data.number_facts import NUMBER_ATTRIBUTES
    return NUMBER_ATTRIBUTES
  if kb in WORLD_SIZES:
    from memjax.data.world_facts import WORLD_ATTRIBUTES
    return WORLD_ATTRIBUTES
  if kb not in KB_SIZES:
    raise DataError(f"kb={kb!r} is not a knowledge-base size; allowed: {list(KB_NAMES)}")
  return ATTRIBUTES
