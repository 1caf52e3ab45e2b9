"""Tokenizers behind one small interface: byte-level (default), BPE (SentencePiece), tokenizer files.

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

Tokenizer files (``data.tokenizer = "sentencepiece:PATH" | "hf:PATH"``, ``tokenizer_from_file``):
any SentencePiece ``.model`` (``SentencePieceTokenizer``, kind ``"sentencepiece"``) or Hugging Face
``tokenizer.json`` (``HFTokenizer``, through the ``tokenizers`` package). Their bos / eos / pad ids
are the file's own (not the table above); a file without pad pads with eos and one without bos
starts documents with eos (padding is masked, so its id is never learned); no eos is an error.

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

import functools
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from memjax.config import MIN_BPE_VOCAB, TOKENIZER_FILE_KINDS
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


class _FileSpecialIds:
  """Special ids read from a tokenizer file (set ``_pad``, ``_eos``, ``_bos`` in ``__init__``)."""

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int:
    return self._bos


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


class SentencePieceTokenizer(_FileSpecialIds):
  """A SentencePiece model: a BPE from ``train_bpe`` or any ``.model`` file (``sentencepiece:PATH``).

  Special ids are the model's own: a model trained by ``train_bpe`` has pad 0, eos 1, bos 2. A model
  without a pad piece pads with its eos id and one without a bos piece starts documents with eos
  (padding is masked by ``segment_ids`` / ``loss_mask``, so its id never reaches the loss); a model
  without eos is an error (every packed document ends with it).

  Build it with ``train_bpe``, ``load_tokenizer`` or ``tokenizer_from_file``; the constructor takes the
  serialized model.
  """

  def __init__(self, model_proto: bytes, *, kind: str = "bpe", path: str | None = None):
    import sentencepiece as spm  # Imported lazily: only the SentencePiece tokenizers need it.

    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.kind = kind
    self.path = path  # the file it was read from (None: trained or built in memory)
    eos = int(self._sp.eos_id())
    if eos < 0:
      raise DataError(f"SentencePiece model {path or '(in memory)'!r} has no eos piece; memjax ends every "
                      "document with eos")
    pad, bos = int(self._sp.pad_id()), int(self._sp.bos_id())
    self._eos = eos
    self._pad = pad if pad >= 0 else eos
    self._bos = bos if bos >= 0 else eos

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
    return functools.partial(SentencePieceTokenizer, kind=self.kind, path=self.path), (self._proto,)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


# Special tokens looked up in a tokenizer.json that comes without a tokenizer_config.json naming them.
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>", "<|im_start|>")
_HF_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]", "<|eot_id|>", "<|im_end|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer(_FileSpecialIds):
  """A Hugging Face ``tokenizer.json`` (``hf:PATH``) through the ``tokenizers`` package.

  Encodes without adding special tokens (the pipeline adds bos / eos itself). The special tokens are
  those a ``tokenizer_config.json`` beside the file names (``bos_token`` / ``eos_token`` /
  ``pad_token``), else the file's first added token among the usual names (``<s>``, ``</s>``,
  ``<|endoftext|>``, ``<pad>``, ...). No eos is an error; no bos starts documents with eos (GPT-2's
  convention) and no pad pads with eos (padding is masked). ``decode`` drops special tokens.

  Example:
    >>> tok = HFTokenizer(json_text)  # doctest: +SKIP
    >>> tok.decode(tok.encode("hé")), tok.eos_id  # doctest: +SKIP
    ('hé', 2)
  """

  kind = "hf"

  def __init__(self, json_text: str, *, path: str | None = None, special: dict | None = None):
    from tokenizers import Tokenizer as _HF

    self._json = json_text
    self.path = path  # the file it was read from (None: trained or built in memory)
    self._special = dict(special or {})
    where = path or "(in memory)"
    try:
      self._tok = _HF.from_str(json_text)
    except Exception as err:  # noqa: BLE001 - the Rust side raises a plain Exception on bad JSON
      raise DataError(f"tokenizer file {where!r} is not a Hugging Face tokenizer.json "
                      f"({' '.join(str(err).split())[:120]})") from None

    def find(role: str, names) -> int | None:
      name = self._special.get(role)
      if name is not None:
        tid = self._tok.token_to_id(name)
        if tid is None:
          raise DataError(f"tokenizer file {where!r}: its tokenizer_config.json names {role}={name!r}, "
                          "which is not in the vocabulary")
        return int(tid)
      for name in names:
        tid = self._tok.token_to_id(name)
        if tid is not None:
          return int(tid)
      return None

    eos = find("eos_token", _HF_EOS)
    if eos is None:
      raise DataError(f"tokenizer file {where!r} has no eos token (looked for {list(_HF_EOS)}; name it as "
                      "eos_token in a tokenizer_config.json beside it)")
    bos, pad = find("bos_token", _HF_BOS), find("pad_token", _HF_PAD)
    self._eos = eos
    self._bos = eos if bos is None else bos
    self._pad = eos if pad is None else pad

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: str | os.PathLike) -> None:
    _atomic_write(path, self._json.encode("utf-8"))

  def __reduce__(self):  # pickles by its JSON (e.g. into Grain worker processes)
    return functools.partial(HFTokenizer, path=self.path, special=self._special), (self._json,)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def tokenizer_from_file(spec: str) -> Tokenizer:
  """The tokenizer a ``data.tokenizer`` value ``"sentencepiece:PATH"`` or ``"hf:PATH"`` names.

  ``sentencepiece:PATH`` reads a SentencePiece ``.model``; ``hf:PATH`` a ``tokenizer.json`` (or a
  directory holding one), with a ``tokenizer_config.json`` beside it if present (see ``HFTokenizer``).
  A missing file or one of the other kind raises a one-line ``DataError`` naming it.

  Example:
    >>> tokenizer_from_file("hf:/nowhere/tokenizer.json")
    Traceback (most recent call last):
    ...
    memjax.data.errors.DataError: tokenizer='hf:/nowhere/tokenizer.json': cannot read '/nowhere/tokenizer.json': No such file or directory
  """
  kind, sep, path = str(spec).partition(":")
  if not sep or kind not in TOKENIZER_FILE_KINDS or not path:
    raise DataError(f"tokenizer={spec!r} must be 'byte', 'bpe', 'sentencepiece:PATH' or 'hf:PATH'")
  path = os.path.expanduser(path)
  if kind == "hf" and os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as err:
    raise DataError(f"tokenizer={spec!r}: cannot read {path!r}: {err.strerror}") from None
  if kind == "sentencepiece":
    if blob.lstrip().startswith(b"{"):
      raise DataError(f"tokenizer={spec!r}: {path!r} is JSON, not a SentencePiece model (for a tokenizer.json "
                      f"use 'hf:{path}')")
    try:
      return SentencePieceTokenizer(blob, kind="sentencepiece", path=path)
    except DataError:
      raise
    except Exception as err:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on a bad proto
      raise DataError(f"tokenizer={spec!r}: {path!r} is not a SentencePiece model ({type(err).__name__})") from None
  try:
    text = blob.decode("utf-8")
    json.loads(text)
  except ValueError:
    raise DataError(f"tokenizer={spec!r}: {path!r} is not a tokenizer.json (not UTF-8 JSON; for a SentencePiece "
                    f"model use 'sentencepiece:{path}')") from None
  special = {}
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, ValueError):
      raise DataError(f"tokenizer={spec!r}: {config_path!r} is not valid JSON") from None
    for role in ("bos_token", "eos_token", "pad_token"):
      value = cfg.get(role) if isinstance(cfg, dict) else None
      if isinstance(value, dict):  # {"content": "<s>", ...} in older files
        value = value.get("content")
      if isinstance(value, str):
        special[role] = value
  try:
    return HFTokenizer(text, path=path, special=special)
  except DataError as err:
    raise DataError(f"tokenizer={spec!r}: {err}") from None


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
