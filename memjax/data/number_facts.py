"""Numeric facts: people with ID-like numbers, many bits per token, for capacity-bound knowledge runs.

The synthetic knowledge base (``memjax.data.knowledge``) spends ~15 BPE tokens on a fact worth ~6.6
bits (0.45 bits a token), so a model has to read tens of millions of tokens before it is limited by
its parameters rather than by its steps: more than two CPU cores can afford. This base keeps the same
people, splits, templates-per-fact protocol and question form, but every attribute is a number drawn
uniformly from its digit strings and every template is short, so a fact is ~8-9 tokens for 10-20
bits (about 2 bits a token):

  ==========  ======  ==========  ===========================================
  attribute   digits  bits        template 0 (the QA prompt ends before the value)
  ==========  ======  ==========  ===========================================
  badge       5       16.6        "{name}'s badge is {value}."
  room        4       13.3        "{name}'s room is {value}."
  phone       6       19.9        "{name}'s phone is {value}."
  postcode    5       16.6        "{name}'s postcode is {value}."
  locker      3       10.0        "{name}'s locker is {value}."
  pin         4       13.3        "{name}'s pin is {value}."
  ==========  ======  ==========  ===========================================

89.7 bits a person. Sizes (``memjax.config.NUMBER_SIZES``: people, training documents per person):

  ===============  ======  =====  ============  =================================
  preset           people  facts  bits          use
  ===============  ======  =====  ============  =================================
  numbers_tiny     20      120    1,794         tests
  numbers_small    300     1,800  26,900        capacity probes (docs/results.md)
  numbers_medium   1,000   6,000  89,700
  numbers_large    10,000  60,000 897,000
  ===============  ======  =====  ============  =================================

Names come from ``make_names`` with the same seed as the synthetic base; the numbers from their own
random stream. Everything else (4 training documents a person, each fact once in each of its 4
phrasings; a validation document with random templates; the ``qa``, ``train_questions`` and
``qa_question`` splits) is the knowledge base's, through ``MemjaxKnowledge``.

Example:
  >>> people = number_entities(2, seed=0)
  >>> len(people[0].fact("phone"))
  6
  >>> qa_pairs(people, NUMBER_ATTRIBUTES)[0]["prompt"] == f"{people[0].name}'s badge is"
  True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from memjax.config import NUMBER_SIZES
from memjax.data._tfds import code_path_of, quiet_prepare
from memjax.data.errors import DataError
from memjax.data.knowledge import (Attribute, Entity, KnowledgeConfig, MemjaxKnowledge, _check_seed,
                                   make_names, qa_pairs)

_STREAM_NUMBERS = 5  # a random stream of its own (the synthetic base uses 1-4)


class DigitStrings(Sequence):
  """Every ``width``-digit string, zero padded, as a lazy sequence (``len`` = 10 ** width).

  Example:
    >>> d = DigitStrings(3)
    >>> len(d), d[7], d[999]
    (1000, '007', '999')
  """

  def __init__(self, width: int):
    self.width = width

  def __len__(self) -> int:
    return 10 ** self.width

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    return f"{i % len(self):0{self.width}d}"

  def __eq__(self, other):
    return isinstance(other, DigitStrings) and other.width == self.width

  def __hash__(self):
    return hash(("DigitStrings", self.width))


def _number(name: str, width: int, noun: str) -> Attribute:
  return Attribute(name, DigitStrings(width), (
      f"{{name}}'s {noun} is {{value}}.",
      f"{{name}} has {noun} {{value}}.",
      f"The {noun} of {{name}} is {{value}}.",
      f"{noun.capitalize()} {{value}} is {{name}}'s."),
      f"Q: What is {{name}}'s {noun}? A:")


NUMBER_ATTRIBUTES: tuple[Attribute, ...] = (
    _number("badge", 5, "badge"),
    _number("room", 4, "room"),
    _number("phone", 6, "phone"),
    _number("postcode", 5, "postcode"),
    _number("locker", 3, "locker"),
    _number("pin", 4, "pin"),
)
NUMBER_ATTRIBUTE_NAMES = tuple(a.name for a in NUMBER_ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class NumberEntity(Entity):
  """A person: ``facts`` aligned with ``NUMBER_ATTRIBUTES`` (digit strings)."""

  def fact(self, attribute: str) -> str:
    if attribute not in NUMBER_ATTRIBUTE_NAMES:
      raise DataError(f"attribute={attribute!r} is not a numeric attribute; allowed: {list(NUMBER_ATTRIBUTE_NAMES)}")
    return self.facts[NUMBER_ATTRIBUTE_NAMES.index(attribute)]


def number_entities(num_entities: int, seed: int) -> list[NumberEntity]:
  """``num_entities`` people (``make_names``), each number drawn uniformly from its digit strings."""
  if isinstance(num_entities, bool) or not isinstance(num_entities, int) or num_entities <= 0:
    raise DataError(f"num_entities={num_entities!r} must be a positive int")
  names = make_names(num_entities, seed)
  rng = np.random.default_rng([seed, _STREAM_NUMBERS])
  ids_AxE = [rng.integers(len(a.values), size=num_entities).tolist() for a in NUMBER_ATTRIBUTES]
  return [NumberEntity(e, names[e], tuple(a.values[ids_E[e]] for a, ids_E in zip(NUMBER_ATTRIBUTES, ids_AxE)))
          for e in range(num_entities)]


def number_builder_config(size: str, seed: int = 0) -> KnowledgeConfig:
  """The config of a preset in ``NUMBER_SIZES`` and a seed; named ``size`` or ``f"{size}_seed{seed}"``.

  Example:
    >>> number_builder_config("numbers_small", seed=1).name
    'numbers_small_seed1'
  """
  if size not in NUMBER_SIZES:
    raise DataError(f"kb={size!r} is not a numeric-facts preset; allowed: {list(NUMBER_SIZES)}")
  _check_seed(seed)
  entities, bios = NUMBER_SIZES[size]
  name = size if seed == 0 else f"{size}_seed{seed}"
  return KnowledgeConfig(name=name, num_entities=entities, bios_per_entity=bios, seed=int(seed),
                         description=f"{entities} people x {len(NUMBER_ATTRIBUTES)} numbers, seed {seed}")


class MemjaxNumberFacts(MemjaxKnowledge):
  """TFDS builder of the numeric facts: the knowledge base's splits and features, numbers for values."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = code_path_of(__file__)  # see memjax.data._tfds
  RELEASE_NOTES = {"1.0.0": "First release: 6 numeric attributes (3-6 digits), 4 templates each."}
  BUILDER_CONFIGS = [number_builder_config(size) for size in NUMBER_SIZES]
  DEFAULT_CONFIG_NAME = "numbers_small"
  attributes = NUMBER_ATTRIBUTES
  description = __doc__.split("\n\n")[0]

  def make_entities(self) -> list[Entity]:
    cfg = self.builder_config
    return number_entities(cfg.num_entities, cfg.seed)


def prepare_number_facts(data_dir: str | os.PathLike, size: str = "numbers_small", seed: int = 0
                         ) -> MemjaxNumberFacts:
  """Builds (once) and returns the numeric-facts builder; read splits with ``.as_data_source``.

  Example:
    >>> prepare_number_facts("/tmp/data", "numbers_tiny").as_data_source("qa")[0]["attribute"]  # doctest: +SKIP
    b'badge'
  """
  cfg = number_builder_config(size, seed)
  config = cfg.name if cfg.name in MemjaxNumberFacts.builder_configs else cfg
  builder = MemjaxNumberFacts(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  quiet_prepare(builder)
  return builder
