"""``DataConfig``: the typed, validated description of what a run trains and evaluates on.

Its fields are exactly the keyword arguments of ``memjax.data.make_pipeline`` besides the shapes
(``seq_len``, ``batch_size``), the QA file and the process placement, so a trainer calls::

  pipe = make_pipeline(**dataclasses.asdict(cfg.data), seq_len=T, batch_size=B,
                       qa_jsonl=cfg.eval.qa_jsonl)

Where prepared data lives (``data_dir=None``): ``$MEMJAX_DATA_DIR`` if set, else
``~/.cache/memjax/data``. Prepared data is a deterministic function of its config, so one cache
serves every run and workdir; pass ``data_dir`` (e.g. ``<workdir>/data``) to keep a run's data
beside it.

Example:
  >>> DataConfig(kb="tiny", tokenizer="bpe").bpe_vocab_size
  1024
  >>> DataConfig(tokenizer="wordpiece")
  Traceback (most recent call last):
  ...
  memjax.data.errors.DataError: DataConfig.tokenizer='wordpiece' is not supported; allowed: ['byte', 'bpe']
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from memjax.data.errors import DataError
from memjax.data.knowledge import KB_SIZES
from memjax.data.local_text import VALIDATION_FRACTION
from memjax.data.tokenizers import MIN_BPE_VOCAB, TOKENIZERS

DATA_DIR_ENV = "MEMJAX_DATA_DIR"


def default_data_dir() -> str:
  """``$MEMJAX_DATA_DIR`` if set, else ``~/.cache/memjax/data``."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "memjax", "data")


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train and evaluate on.

  Attributes:
    kb: synthetic knowledge-base size, one of ``KB_SIZES`` ("tiny", "small", "medium", "large").
      Its ``qa`` split is the QA evaluation unless a QA file is given; unused for training
      when ``text_glob`` is set.
    kb_seed: seed of the knowledge-base world (names, facts, templates); 0 is the standard world.
    text_glob: train on local text files matching this glob (.txt, .md, .py, .jsonl) instead of
      the knowledge base; ``None`` trains on the knowledge base.
    validation_fraction: fraction of local-text documents (by path hash) held out, in [0, 1).
    tokenizer: "byte" (UTF-8 bytes, 259 ids) or "bpe" (SentencePiece BPE trained on the train split).
    bpe_vocab_size: BPE vocabulary size (a soft limit), >= 320.
    data_dir: where prepared TFDS data and tokenizers live; ``None`` means ``default_data_dir()``.
    seed: shuffling / packing seed of the input pipeline.
  """

  kb: str = "small"
  kb_seed: int = 0
  text_glob: str | None = None
  validation_fraction: float = VALIDATION_FRACTION
  tokenizer: str = "byte"
  bpe_vocab_size: int = 1024
  data_dir: str | None = None
  seed: int = 0

  def __post_init__(self):
    owner = "DataConfig"
    if self.kb not in KB_SIZES:
      raise DataError(f"{owner}.kb={self.kb!r} is not a knowledge-base size; allowed: {list(KB_SIZES)}")
    for name in ("kb_seed", "seed"):
      value = getattr(self, name)
      if not _is_int(value) or not 0 <= value < 2**32:
        raise DataError(f"{owner}.{name}={value!r} must be an int in [0, 2**32)")
    if self.text_glob is not None and (not isinstance(self.text_glob, str) or not self.text_glob.strip()):
      raise DataError(f"{owner}.text_glob={self.text_glob!r} must be None (use the knowledge base) or a "
                      "non-empty glob string")
    vf = self.validation_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
      raise DataError(f"{owner}.validation_fraction={vf!r} must be a float in [0, 1)")
    if self.tokenizer not in TOKENIZERS:
      raise DataError(f"{owner}.tokenizer={self.tokenizer!r} is not supported; allowed: {list(TOKENIZERS)}")
    if not _is_int(self.bpe_vocab_size) or self.bpe_vocab_size < MIN_BPE_VOCAB:
      raise DataError(f"{owner}.bpe_vocab_size={self.bpe_vocab_size!r} must be an int >= {MIN_BPE_VOCAB} "
                      "(256 byte pieces + specials)")
    if self.data_dir is not None and (not isinstance(self.data_dir, (str, os.PathLike))
                                      or not os.fspath(self.data_dir)):
      raise DataError(f"{owner}.data_dir={self.data_dir!r} must be None (use default_data_dir()) or a path")

  @property
  def resolved_data_dir(self) -> str:
    return os.fspath(self.data_dir) if self.data_dir is not None else default_data_dir()
