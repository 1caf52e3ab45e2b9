"""Tokenizers behind one small interface: byte-level (default) and BPE (SentencePiece).

Both map ``str -> list[int]`` and back, with the same special ids so packed batches look alike:

  ====  =====  =========================================================
  id    name   meaning
  ====  =====  =========================================================
  0     pad    padding (``segment_ids == 0`` there); never a target
  1     eos    ends every document; decoding stops at it
  2     bos    starts every document (the first input of a packed segment)
  ====  =====  =========================================================

* ``ByteTokenizer``: UTF-8 bytes, byte ``b`` is id ``b + 3``; ``vocab_size = 259``. Works on any
  text and needs no training.
* ``SentencePieceTokenizer``: BPE trained locally (``train_bpe``) with byte fallback, identity
  normalisation and no dummy prefix, so ``decode(encode(s)) == s`` for any text without the
  character U+2581 (which SentencePiece uses for spaces and decodes as a space). Id 3 is ``unk``
  (unused thanks to byte fallback); ``"\\n"`` and ``"\\t"`` are single pieces.

``save(path)`` writes one file (JSON for bytes, the SentencePiece model proto for BPE) and
``load_tokenizer(path)`` reads either back.

Example:
  >>> tok = ByteTokenizer()
  >>> tok.encode("hé")
  [107, 198, 172]
  >>> tok.decode(tok.encode("hé"))
  'hé'
  >>> tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id
  (259, 0, 1, 2)
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from memjax.config import MIN_BPE_VOCAB
from memjax.data.errors import DataError

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3  # SentencePiece only



@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline and the QA evaluation need from a tokenizer."""

  kind: str

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def encode_array(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def save(self, path: str | os.PathLike) -> None: ...


class _SpecialIds:
  """The special ids both tokenizers share: pad 0, eos 1, bos 2."""

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID


class ByteTokenizer(_SpecialIds):
  """UTF-8 bytes shifted by the 3 special ids: ``id = byte + 3``; ``vocab_size = 259``.

  ``decode`` drops special ids and replaces invalid UTF-8 (e.g. a cut multi-byte character) with
  U+FFFD rather than raising, so decoding a model's greedy output never fails.

  Example:
    >>> tok = ByteTokenizer()
    >>> ids = tok.encode("Köln ✓")
    >>> len(ids), tok.decode(ids)
    (9, 'Köln ✓')
    >>> tok.decode([tok.bos_id] + ids[:2] + [tok.eos_id])
    'K\ufffd'
  """

  kind = "byte"
  OFFSET = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.OFFSET

  def encode_array(self, text: str) -> np.ndarray:
    """``encode`` as an int32 array (the pipeline's fast path)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    ids_N = np.asarray(ids, np.int64).reshape(-1)
    ids_N = ids_N[(ids_N >= self.OFFSET) & (ids_N < self.vocab_size)]
    return (ids_N - self.OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def save(self, path: str | os.PathLike) -> None:
    _atomic_write(path, json.dumps({"kind": self.kind, "vocab_size": self.vocab_size}).encode())

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


class SentencePieceTokenizer(_SpecialIds):
  """A SentencePiece model (BPE from ``train_bpe``) with the shared special ids.

  Build it with ``train_bpe`` or ``load_tokenizer``; the constructor takes the serialized model.
  """

  kind = "bpe"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # Imported lazily: only the BPE tokenizer needs it.

    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id())
    if got != (PAD_ID, EOS_ID, BOS_ID):
      raise DataError(
          f"SentencePiece model has (pad, eos, bos) ids {got}; memjax needs {(PAD_ID, EOS_ID, BOS_ID)}: "
          "train it with memjax.data.train_bpe")

  @property
  def vocab_size(self) -> int:
    return int(self._sp.vocab_size())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def save(self, path: str | os.PathLike) -> None:
    _atomic_write(path, self._proto)

  def __reduce__(self):  # pickles by its model proto (e.g. into Grain worker processes)
    return SentencePieceTokenizer, (self._proto,)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int, *, max_chars: int = 20_000_000) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece tokenizer on ``texts`` (documents), locally and deterministically.

  Documents are fed line by line (SentencePiece trains on "sentences"); at most ``max_chars``
  characters are used. ``vocab_size`` is a soft limit: a corpus too small for it gives fewer pieces.
  """
  import sentencepiece as spm

  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
    raise DataError(f"bpe vocab_size={vocab_size!r} must be an int >= {MIN_BPE_VOCAB} (256 byte pieces + specials)")

  def lines():
    used = 0
    for text in texts:
      for line in text.split("\n"):
        if line.strip():
          yield line
          used += len(line)
          if used >= max_chars:
            return

  line_iter = lines()
  first = next(line_iter, None)
  if first is None:
    raise DataError("cannot train a BPE tokenizer on an empty corpus (no non-blank line)")

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.chain([first], line_iter), model_writer=model, model_type="bpe", vocab_size=vocab_size,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, byte_fallback=True,
      character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
      user_defined_symbols=["\n", "\t"], hard_vocab_limit=False, max_sentence_length=1 << 16,
      shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  return SentencePieceTokenizer(model.getvalue())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by ``save``: a byte tokenizer's JSON or a SentencePiece model.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tok.json")
    >>> ByteTokenizer().save(path)
    >>> load_tokenizer(path)
    ByteTokenizer(vocab_size=259)
  """
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as err:
    raise DataError(f"cannot read tokenizer file {os.fspath(path)!r}: {err.strerror}") from None
  if blob.startswith(b"{"):
    try:
      meta = json.loads(blob)
    except ValueError:
      raise DataError(f"tokenizer file {os.fspath(path)!r} starts like JSON but is not valid JSON") from None
    if meta.get("kind") != "byte":
      raise DataError(f"tokenizer file {os.fspath(path)!r} has kind={meta.get('kind')!r}; allowed: 'byte'")
    return ByteTokenizer()
  try:
    return SentencePieceTokenizer(blob)
  except DataError:
    raise
  except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad proto
    raise DataError(f"tokenizer file {os.fspath(path)!r} is neither byte-tokenizer JSON nor a SentencePiece "
                    f"model ({type(err).__name__})") from None


def _atomic_write(path: str | os.PathLike, blob: bytes) -> None:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
