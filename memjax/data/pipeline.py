"""The Grain input pipeline: shard, shuffle, tokenize, chunk, pack, batch; and ``make_pipeline``.

Shapes: ``B`` rows per batch (per process), ``T`` sequence length, ``N`` tokens of one document.

The batch contract (a dict of numpy arrays; what the trainer relies on):

  ===============  =========  ==========  ====================================================
  key              dtype      shape       meaning
  ===============  =========  ==========  ====================================================
  ``inputs``       int32      [B, T]      token ids; ``pad_id`` (0) on padding
  ``targets``      int32      [B, T]      the next token of the same document; 0 on padding
  ``loss_mask``    float32    [B, T]      1 where ``targets`` is a real next token, else 0
  ``segment_ids``  int32      [B, T]      1, 2, ... per packed segment in a row; 0 = padding
  ``positions``    int32      [B, T]      0, 1, ... restarting at every segment; 0 on padding
  ===============  =========  ==========  ====================================================

Who uses what: **attention** masks with ``segment_ids`` (a query attends to keys of the same
nonzero segment, causally; ``positions`` feed the position encoding); the **loss** weighs the
per-token cross-entropy of ``targets`` by ``loss_mask`` (sum / ``loss_mask.sum()``).

Packing semantics. A document of ``N`` tokens becomes the stream ``[bos] d_0 .. d_{N-1} [eos]``
and the ``N + 1`` (input, target) pairs ``inputs = stream[:-1]``, ``targets = stream[1:]``: every
document token is predicted, ``eos`` ends the document and ``bos`` is never a target. The pairs are
cut into chunks of at most ``T`` (a document longer than ``T`` gives several chunks, each its own
segment with positions from 0, since a row cannot attend to the previous row). Chunks are packed
whole into rows by Grain's first-fit packing (``num_packing_bins`` rows at a time, then the rows are
shuffled) and never split. Since each target travels with its input, no target ever crosses into
another document (a document's last token predicts ``eos``, not the next document's first token),
so ``loss_mask`` is 0 exactly on padding: ``loss_mask == (segment_ids > 0)``.

Order, sharding and state. Documents are sharded first, ``source[process_index::process_count]``
(disjoint, together all documents; outside sources, ``memjax.data.sources``, shard by file first),
then shuffled globally with ``seed`` (a new permutation every
epoch) and repeated forever (``num_epochs=None``). The iterator is a ``grain.DatasetIterator``:
``state = it.get_state()`` (a small JSON-able dict of this process's position) and
``fresh_it.set_state(state)`` resumes at exactly the next batch; each process saves its own state.

Example:
  >>> chunks = document_chunks(np.array([7, 8, 9], np.int32), seq_len=3, bos_id=2, eos_id=1)
  >>> [(c["inputs"].tolist(), c["targets"].tolist()) for c in chunks]
  [([2, 7, 8], [7, 8, 9]), ([9], [1])]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from memjax.config import DataConfig
from memjax.data.errors import DataError
from memjax.data.qa import QAItem, load_qa_items, read_qa_jsonl
from memjax.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
                "positions": np.int32}


# ----- pure pieces ---------------------------------------------------------------------------

def document_chunks(tokens_N: np.ndarray, *, seq_len: int, bos_id: int, eos_id: int) -> list[dict[str, np.ndarray]]:
  """``[bos] + tokens + [eos]`` as (inputs, targets) pairs, cut into chunks of at most ``seq_len``."""
  stream = np.concatenate([np.array([bos_id], np.int32), np.asarray(tokens_N, np.int32),
                           np.array([eos_id], np.int32)])
  inputs, targets = stream[:-1], stream[1:]
  return [{"inputs": inputs[i:i + seq_len], "targets": targets[i:i + seq_len]}
          for i in range(0, len(inputs), seq_len)]


def rows_to_batch(rows: Sequence[dict[str, np.ndarray]], batch_size: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Stacks packed rows (Grain's ``inputs``/``targets`` + ``*_segment_ids``/``*_positions``) into the
  batch contract, adding all-padding rows up to ``batch_size`` (only the last batch of a finite pass);
  padded ``inputs`` hold ``pad_id`` (padded ``targets`` stay 0, out of the loss)."""
  seq_len = len(rows[0]["inputs"])
  out = {
      "inputs": np.zeros((batch_size, seq_len), np.int32),
      "targets": np.zeros((batch_size, seq_len), np.int32),
      "segment_ids": np.zeros((batch_size, seq_len), np.int32),
      "positions": np.zeros((batch_size, seq_len), np.int32),
  }
  for b, row in enumerate(rows):
    out["inputs"][b] = row["inputs"]
    out["targets"][b] = row["targets"]
    out["segment_ids"][b] = row["inputs_segment_ids"]
    out["positions"][b] = row["inputs_positions"]
  out["loss_mask"] = (out["segment_ids"] > 0).astype(np.float32)
  if pad_id:
    out["inputs"][out["segment_ids"] == 0] = pad_id
  return {k: out[k] for k in BATCH_KEYS}


# ----- Grain transforms (classes, so they pickle for worker processes) -----------------------

class _Tokenize(grain.transforms.Map):
  """A source record -> int32 tokens: a dict's ``field`` (or the value itself) tokenized when it is
  text, taken as it is when it is already token ids (a pre-tokenized source)."""

  def __init__(self, tokenizer: Tokenizer, field: str = "text"):
    self._tokenizer = tokenizer
    self._field = field

  def map(self, record):
    text = record[self._field] if isinstance(record, dict) else record
    if isinstance(text, np.ndarray):
      return text.astype(np.int32, copy=False)
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return self._tokenizer.encode_array(text)


class _BlockShuffle(grain.MapDataset):
  """Documents of a block-structured source (Parquet row groups) in ``sources.block_permutation``
  order: a new order of blocks, and of rows within each block, every epoch."""

  def __init__(self, parent: grain.MapDataset, block_sizes: Sequence[int], seed: int):
    super().__init__(parent)
    self._n = len(parent)
    self._sizes = list(block_sizes)
    self._seed = seed
    self._perm = (-1, None)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    from memjax.data.sources import block_permutation

    epoch, i = divmod(index, self._n)
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      perm = block_permutation(self._sizes, self._seed, epoch)
      self._perm = (epoch, perm)
    return self._parent[int(perm[i])]

  def __str__(self) -> str:
    return f"_BlockShuffle(blocks={len(self._sizes)}, seed={self._seed})"


class _Chunk(grain.experimental.FlatMapTransform):
  """Tokens -> ``document_chunks``."""

  def __init__(self, seq_len: int, bos_id: int, eos_id: int, max_fan_out: int = 1 << 20):
    self._seq_len, self._bos_id, self._eos_id = seq_len, bos_id, eos_id
    self.max_fan_out = max_fan_out

  def flat_map(self, tokens_N):
    return document_chunks(tokens_N, seq_len=self._seq_len, bos_id=self._bos_id, eos_id=self._eos_id)


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise DataError(f"{name}={value!r} must be a positive int")


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to ``jax.process_index()`` / ``jax.process_count()``; checks ``0 <= index < count``."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_positive("process_count", process_count)
  if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index!r} must be an int in [0, process_count={process_count})")
  return process_index, process_count


def document_dataset(source: Sequence[Any], tokenizer: Tokenizer, *, seed: int = 0, shuffle: bool = True,
                     num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                     block_sizes: Sequence[int] | None = None, text_field: str = "text") -> grain.MapDataset:
  """This process's documents as a ``grain.MapDataset`` of int32 token arrays: sharded
  ``[process_index::process_count]``, shuffled with ``seed`` (by block when ``block_sizes`` is given,
  see ``memjax.data.sources``; a new order each epoch), repeated ``num_epochs`` (``None``: forever)
  and tokenized (a record that already holds token ids is taken as it is).

  Example:
    >>> docs = document_dataset([{"text": "ab"}, {"text": "c"}], ByteTokenizer(), shuffle=False, num_epochs=1)
    >>> [d.tolist() for d in docs]
    [[100, 101], [102]]
  """
  docs = grain.MapDataset.source(source)[process_index::process_count]
  if len(docs) == 0:
    raise DataError(f"process_index={process_index} of process_count={process_count} has no documents "
                    f"(the source has {len(source)})")
  if shuffle and block_sizes is not None and process_count == 1:
    docs = _BlockShuffle(docs, block_sizes, seed)
  elif shuffle:
    docs = docs.shuffle(seed=seed)
  return docs.repeat(num_epochs).map(_Tokenize(tokenizer, text_field))


def pack_batches(docs: grain.MapDataset, *, seq_len: int, batch_size: int, bos_id: int, eos_id: int, pad_id: int = 0,
                 seed: int = 0, shuffle: bool = True, finite: bool = False, num_packing_bins: int | None = None,
                 read_threads: int = 0, workers: int = 0) -> grain.IterDataset:
  """Token documents -> chunks -> first-fit packed rows -> batches (the contract in the module doc).

  ``read_threads`` Grain threads read and tokenize ahead (the order does not depend on them);
  ``workers > 0`` runs the whole pipeline in that many processes (``mp_prefetch``: each takes every
  ``workers``-th document and batches are taken from them in turn, so the order depends on ``workers``).

  Example:
    >>> docs = document_dataset([{"text": "abc"}] * 3, ByteTokenizer())
    >>> batch = next(iter(pack_batches(docs, seq_len=8, batch_size=2, bos_id=2, eos_id=1)))
    >>> batch["inputs"][0, :5].tolist(), batch["segment_ids"][0].tolist()
    ([2, 100, 101, 102, 2], [1, 1, 1, 1, 2, 2, 2, 2])
  """
  bins = max(batch_size, 32) if num_packing_bins is None else num_packing_bins
  _check_positive("num_packing_bins", bins)
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(64, 2 * bins)))
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len, bos_id, eos_id))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=bins, seed=seed,
      shuffle_bins=shuffle)
  ds = ds.batch(batch_size, drop_remainder=not finite,
                batch_fn=functools.partial(rows_to_batch, batch_size=batch_size, pad_id=pad_id))
  if workers:
    from absl import flags  # Grain's workers read its absl flags: outside an absl app, use their defaults

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return ds


def batch_dataset(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_packing_bins: int | None = None,
    read_threads: int = 0,
    workers: int = 0,
    text_field: str = "text",
    block_sizes: Sequence[int] | None = None,
) -> grain.IterDataset:
  """The pipeline as a ``grain.IterDataset`` of batches (see the module doc); ``iter()`` it.

  Args:
    source: random-access records: dicts with a text field (a TFDS ``as_data_source`` split, or a
      list), or the text / int32 token ids themselves (``memjax.data.sources``).
    tokenizer: any ``Tokenizer``.
    seq_len, batch_size: ``T`` and ``B`` (per process).
    seed: shuffle and bin-shuffle seed.
    shuffle: shuffle documents and packed rows (``False`` keeps source order, e.g. for validation).
    num_epochs: passes over the data; ``None`` repeats forever. With a finite number the last
      batch is padded with empty rows up to ``B`` (all-zero ``loss_mask``).
    process_index, process_count: this process's shard; default ``jax.process_index()/count()``.
    num_packing_bins: rows packed at a time by first-fit (more rows, less padding); default ``max(B, 32)``.
    read_threads: Grain read threads (0 reads and tokenizes in the calling thread).
    workers: Grain worker processes (0: none; see ``pack_batches``).
    text_field: the record field holding the text.
    block_sizes: shuffle by blocks of these sizes (see ``document_dataset``).

  Example:
    >>> it = iter(batch_dataset([{"text": "abc"}] * 4, ByteTokenizer(), seq_len=8, batch_size=2,
    ...                         process_index=0, process_count=1))
    >>> next(it)["inputs"].shape
    (2, 8)
  """
  _check_positive("seq_len", seq_len)
  _check_positive("batch_size", batch_size)
  process_index, process_count = resolve_process(process_index, process_count)
  if num_epochs is not None:
    _check_positive("num_epochs", num_epochs)
  docs = document_dataset(source, tokenizer, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                          process_index=process_index, process_count=process_count, block_sizes=block_sizes,
                          text_field=text_field)
  return pack_batches(docs, seq_len=seq_len, batch_size=batch_size, bos_id=tokenizer.bos_id,
                      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed, shuffle=shuffle,
                      finite=num_epochs is not None, num_packing_bins=num_packing_bins,
                      read_threads=read_threads, workers=workers)


class TextSource:
  """Random access to the text field of a prepared TFDS split, as ``{"text": bytes}`` records.

  Reads the split's raw records (``tfds.decode.DeserializeMethod.RAW_BYTES``) and takes the one
  bytes feature from the ``tf.train.Example`` proto: ~18 us per record here instead of ~130 us for
  TFDS's full NumPy decoding of every feature (the knowledge base stores five).
  """

  def __init__(self, builder, split: str, field: str = "text"):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    self._raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self._parse = tf_example_pb2.Example.FromString
    self._field = field

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index: int) -> dict[str, bytes]:
    example = self._parse(self._raw[index])
    return {"text": example.features.feature[self._field].bytes_list.value[0]}

  def __repr__(self) -> str:
    return f"TextSource({self._raw!r}, field={self._field!r})"


class ConcatSource:
  """Random access to several sources one after the other (``len`` is the sum).

  Example:
    >>> src = ConcatSource([[{"text": b"a"}], [{"text": b"b"}, {"text": b"c"}]])
    >>> len(src), src[2]
    (3, {'text': b'c'})
  """

  def __init__(self, sources: Sequence):
    self._sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    i = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._sources[i][index - int(self._starts[i])]

  def __repr__(self) -> str:
    return f"ConcatSource({self._sources!r})"


# ----- the entry point -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pipeline:
  """What ``make_pipeline`` returns.

  Attributes:
    tokenizer: the tokenizer (``vocab_size``, ``pad_id`` / ``eos_id`` / ``bos_id``).
    train: endless iterator of batches (the contract in the module doc), with ``get_state()`` /
      ``set_state()``; save its state with the model checkpoint.
    validation: ``validation()`` returns a fresh iterator over one pass of this process's shard of
      the validation split (no shuffling; last batch padded), or is ``None`` if there is none.
    qa_items: QA items (the QA file if given, else the knowledge base's ``qa`` split; empty for
      local text without a QA file).
    source: ``"<tfds name>/<config name>"`` of the training data (``data.source`` / ``data.mixture``
      as given for outside data).
    data_dir: where the prepared data lives (the resolved ``data_dir``).
    tokenizer_path: the stored BPE model (``None`` for the byte tokenizer).
    metadata: split sizes and, for local text, what was skipped (outside data: per source its
      weight, documents and files read by this process, and the validation size).
    qa_question_items: with ``data.kb_questions``, the question-form QA items of the people whose
      question-form pairs are not in the training text (the ``qa_question`` split); else empty.
  """

  tokenizer: Tokenizer
  train: grain.DatasetIterator
  validation: Callable[[], Iterator[dict[str, np.ndarray]]] | None
  qa_items: list[QAItem]
  source: str
  data_dir: str
  tokenizer_path: str | None
  metadata: dict[str, Any]
  qa_question_items: list[QAItem] = dataclasses.field(default_factory=list)


def external_sources(config: DataConfig) -> list[tuple[str, float]] | None:
  """``[(source, weight), ...]`` of ``data.source`` / ``data.mixture`` (``None``: kb / text_glob).

  Example:
    >>> external_sources(DataConfig(source="jsonl:/data/*.jsonl"))
    [('jsonl:/data/*.jsonl', 1.0)]
  """
  from memjax.data.sources import parse_mixture

  if config.mixture is not None:
    return parse_mixture(config.mixture)
  if config.source is not None:
    return [(config.source, 1.0)]
  return None


def prepare_data(config: DataConfig):
  """Builds (once) the TFDS dataset the config trains on and returns its builder (``None`` for
  ``data.source`` / ``data.mixture``: those are read as they are)."""
  from memjax.data.knowledge import prepare_kb
  from memjax.data.local_text import prepare_local_text

  if external_sources(config) is not None:
    return None
  if config.text_glob is not None:
    return prepare_local_text(config.resolved_data_dir, config.text_glob, config.validation_fraction)
  return prepare_kb(config.resolved_data_dir, config.kb, config.kb_seed)


def _open(config: DataConfig, source: str, split: str, process_index: int, process_count: int):
  from memjax.data.sources import open_source

  return open_source(source, split=split, text_key=config.text_key, tokens_key=config.tokens_key,
                     data_dir=config.resolved_data_dir, process_index=process_index, process_count=process_count)


def _bpe_path_for_sources(config: DataConfig) -> str:
  """Where a BPE trained on ``data.source`` / ``data.mixture`` is kept: named by a hash of the sources,
  the split, the key and every matched file's path, size and mtime."""
  import hashlib

  from memjax.data.sources import match_source_files, parse_source

  digest = hashlib.sha256(f"{config.source}\0{config.mixture}\0{config.split}\0{config.text_key}".encode())
  for source, _ in external_sources(config):
    spec = parse_source(source)
    if spec.kind != "tfds":
      for path in match_source_files(spec):
        st = os.stat(path)
        digest.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return os.path.join(config.resolved_data_dir, "memjax_tokenizers",
                      f"bpe_{config.bpe_vocab_size}_{digest.hexdigest()[:16]}.model")


def tokenizer_for(config: DataConfig, builder=None) -> tuple[Tokenizer, str | None]:
  """The config's tokenizer and the file it lives in (``None`` for bytes).

  ``sentencepiece:PATH`` / ``hf:PATH`` are read from their file. A BPE model is trained on the train
  split once and stored beside it as ``<prepared dataset dir>/tokenizer/bpe_<vocab>.model`` (for
  ``data.source`` / ``data.mixture``: ``<data_dir>/memjax_tokenizers/bpe_<vocab>_<hash>.model``).
  """
  from memjax.data.tokenizers import tokenizer_from_file

  if config.tokenizer == "byte":
    return ByteTokenizer(), None
  if config.tokenizer != "bpe":
    tok = tokenizer_from_file(config.tokenizer)
    return tok, tok.path
  if builder is None and external_sources(config) is None:
    builder = prepare_data(config)
  if builder is not None:
    path = os.path.join(os.fspath(builder.data_dir), "tokenizer", f"bpe_{config.bpe_vocab_size}.model")
    if not os.path.exists(path):
      source = TextSource(builder, "train")
      texts = (source[i]["text"].decode("utf-8") for i in range(len(source)))
      train_bpe(texts, config.bpe_vocab_size).save(path)
    return load_tokenizer(path), path
  if config.tokens_key is not None:
    raise DataError(f"tokenizer='bpe' trains on text, but tokens_key={config.tokens_key!r} reads token ids: name "
                    "the tokenizer the ids came from (sentencepiece:PATH or hf:PATH)")
  path = _bpe_path_for_sources(config)
  if not os.path.exists(path):
    opened = [_open(config, s, config.split, 0, 1) for s, _ in external_sources(config)]

    def texts():
      for o in opened:  # in source order, each file in order; train_bpe stops at its max_chars
        for i in range(len(o.values)):
          yield o.values[i]

    train_bpe(texts(), config.bpe_vocab_size).save(path)
  return load_tokenizer(path), path


def _check_token_ids(name: str, ids, tokenizer: Tokenizer) -> None:
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
    raise DataError(f"source '{name}': token ids in [{int(ids.min())}, {int(ids.max())}] do not fit the tokenizer's "
                    f"vocab_size={tokenizer.vocab_size} (set data.tokenizer to the one the ids came from)")


def _external_pipeline(config: DataConfig, sources, tok: Tokenizer, *, seq_len: int, batch_size: int,
                       process_index: int, process_count: int, num_packing_bins: int | None):
  from memjax.data.sources import parse_source, tfds_splits

  common = dict(seq_len=seq_len, batch_size=batch_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                num_packing_bins=num_packing_bins, read_threads=config.read_threads)
  docs, metadata = [], {"sources": {}}
  for i, (source, weight) in enumerate(sources):
    o = _open(config, source, config.split, process_index, process_count)
    if config.tokens_key is not None:
      _check_token_ids(o.name, o.values[0], tok)
    docs.append(document_dataset(o.values, tok, seed=config.seed + i, process_index=o.doc_index,
                                 process_count=o.doc_count, block_sizes=o.block_sizes))
    metadata["sources"][o.name] = {"weight": weight, "documents": len(o.values), "files": len(o.files),
                                   "total_files": o.total_files}
  mixed = docs[0] if len(docs) == 1 else grain.MapDataset.mix(docs, [w for _, w in sources])
  train = iter(pack_batches(mixed, seed=config.seed, workers=config.workers, **common))

  validation = None
  if len(sources) == 1 and parse_source(sources[0][0]).kind == "tfds" and config.split != "validation":
    spec = parse_source(sources[0][0])
    if "validation" in tfds_splits(spec, config.resolved_data_dir):
      val = _open(config, sources[0][0], "validation", process_index, process_count)
      metadata["validation"] = len(val.values)
      if len(val.values) >= val.doc_count:
        def validation():
          vdocs = document_dataset(val.values, tok, shuffle=False, num_epochs=1, process_index=val.doc_index,
                                   process_count=val.doc_count)
          return iter(pack_batches(vdocs, shuffle=False, finite=True, **common))
  return train, validation, metadata


def make_pipeline(
    config: DataConfig | None = None,
    *,
    seq_len: int,
    batch_size: int,
    qa_jsonl: str | os.PathLike | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_packing_bins: int | None = None,
    **fields: Any,
) -> Pipeline:
  """Prepares the data (once), the tokenizer and the iterators a training run needs.

  Args:
    config: the run's ``DataConfig`` (``cfg.data``); ``None`` means ``DataConfig()``.
    seq_len, batch_size: ``T`` and ``B``; ``batch_size`` is per process.
    qa_jsonl: ``eval.qa_jsonl``, a QA file replacing the knowledge base's ``qa`` split.
    process_index, process_count: this process's shard; default JAX's.
    num_packing_bins: rows packed at a time (see ``batch_dataset``).
    **fields: ``DataConfig`` fields replacing those of ``config``, e.g.
      ``make_pipeline(seq_len=128, batch_size=16, kb="small", tokenizer="bpe")`` or
      ``make_pipeline(seq_len=1024, batch_size=8, source="parquet:/data/*.parquet", tokenizer="hf:tok.json")``.

  See the module doc for the batch contract.
  """
  config = DataConfig() if config is None else config
  if not isinstance(config, DataConfig):
    raise DataError(f"config={config!r} must be a DataConfig (or None)")
  unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(DataConfig)})
  if unknown:
    raise DataError(f"make_pipeline got {unknown[0]}=..., which is not a DataConfig field; allowed: "
                    f"{[f.name for f in dataclasses.fields(DataConfig)]}")
  if fields.get("data_dir") is not None:
    fields["data_dir"] = os.fspath(fields["data_dir"])
  config = dataclasses.replace(config, **fields)
  _check_positive("seq_len", seq_len)
  _check_positive("batch_size", batch_size)
  process_index, process_count = resolve_process(process_index, process_count)
  qa_items = read_qa_jsonl(qa_jsonl) if qa_jsonl is not None else None  # fail fast on a bad QA file

  sources = external_sources(config)
  if sources is not None:
    tok, tok_path = tokenizer_for(config)
    train, validation, metadata = _external_pipeline(
        config, sources, tok, seq_len=seq_len, batch_size=batch_size, process_index=process_index,
        process_count=process_count, num_packing_bins=num_packing_bins)
    return Pipeline(tokenizer=tok, train=train, validation=validation, qa_items=qa_items or [],
                    source=config.mixture or config.source, data_dir=config.resolved_data_dir,
                    tokenizer_path=tok_path, metadata=metadata)

  builder = prepare_data(config)
  tok, tok_path = tokenizer_for(config, builder)
  common = dict(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                process_count=process_count, num_packing_bins=num_packing_bins, read_threads=config.read_threads)
  train_source = TextSource(builder, "train")
  questions = config.kb_questions and config.text_glob is None  # (only the knowledge base has them)
  if questions:  # the question-form pairs of half the people, as more training documents
    train_source = ConcatSource([train_source, TextSource(builder, "train_questions")])
  train = iter(batch_dataset(train_source, tok, seed=config.seed, workers=config.workers, **common))

  validation = None
  if "validation" in builder.info.splits:
    val_source = TextSource(builder, "validation")
    if len(val_source) >= process_count:
      def validation():
        return iter(batch_dataset(val_source, tok, shuffle=False, num_epochs=1, **common))

  if qa_items is None:
    qa_items = load_qa_items(config.resolved_data_dir, config.kb, config.kb_seed) if config.text_glob is None else []
  qa_question_items = (load_qa_items(config.resolved_data_dir, config.kb, config.kb_seed, split="qa_question")
                       if questions else [])

  metadata: dict[str, Any] = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
  metadata.update(dict(builder.info.metadata or {}))
  return Pipeline(tokenizer=tok, train=train, validation=validation, qa_items=qa_items,
                  source=f"{builder.name}/{builder.builder_config.name}",
                  data_dir=config.resolved_data_dir, tokenizer_path=tok_path, metadata=metadata,
                  qa_question_items=qa_question_items)
