"""Training data from outside memjax: TFDS datasets, ArrayRecord / Parquet / JSONL shards, mixtures.

``data.source`` names one source (``data.mixture`` several, with weights):

  ==============================  =================================================================
  ``tfds:NAME[/CONFIG][:VERSION]``  a TFDS dataset already prepared (``array_record``) in ``data.data_dir``,
                                  read through ``tfds.data_source`` (no TensorFlow, never a download);
                                  split ``data.split``
  ``array_record:GLOB``           ArrayRecord files; each record a serialized ``tf.train.Example`` (what
                                  TFDS writes) or a JSON object
  ``parquet:GLOB``                Parquet files; a string column or a list-of-int column
  ``jsonl:GLOB``                  JSON Lines files; one object a line (blank lines skipped)
  ==============================  =================================================================

Every record gives one document: its ``data.text_key`` field (text, tokenized by ``data.tokenizer``)
or, when ``data.tokens_key`` is set, that field's token ids as they are (the tokenizer is not run;
it still fixes the vocabulary and the bos / eos / pad ids).

Per-process sharding is by **file** (``files[process_index::process_count]``, so each host reads
only its files) whenever there are at least as many files as processes; Parquet then falls back to
row groups, and otherwise to documents (``[process_index::process_count]`` of all of them). Each
process's shard is disjoint from the others' and together they cover the source.

Order: TFDS, ArrayRecord and JSONL shuffle documents globally (random access is cheap); Parquet,
whose unit of reading is a row group, shuffles the order of its row groups and the rows within each
(a new order every epoch), so a reader decodes each row group once per epoch.

Example:
  >>> parse_source("tfds:c4/en:3.1.0")
  SourceSpec(kind='tfds', target='c4/en:3.1.0')
  >>> parse_source("parquet:/data/shards/*.parquet").kind
  'parquet'
  >>> parse_mixture("jsonl:/a/*.jsonl=3, parquet:/b/*.parquet=1")
  [('jsonl:/a/*.jsonl', 0.75), ('parquet:/b/*.parquet', 0.25)]
  >>> shard_files(["a", "b", "c"], 1, 2)
  (['b'], 0, 1)
  >>> shard_files(["a"], 1, 2)
  (['a'], 1, 2)
"""

from __future__ import annotations

import collections
import dataclasses
import glob as glob_lib
import json
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from memjax.data.errors import DataError

SOURCE_KINDS = ("tfds", "array_record", "parquet", "jsonl")
_ROW_GROUP_CACHE = 16  # row groups a Parquet reader keeps decoded (per process)


# ----- pure pieces ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed ``data.source``: ``kind`` (one of ``SOURCE_KINDS``) and its ``target`` (a glob, or the
  TFDS ``NAME[/CONFIG][:VERSION]``)."""

  kind: str
  target: str

  def __str__(self) -> str:
    return f"{self.kind}:{self.target}"


def parse_source(text: str) -> SourceSpec:
  """``"KIND:TARGET"`` -> ``SourceSpec``; a one-line ``DataError`` naming the allowed forms otherwise.

  Example:
    >>> str(parse_source("jsonl:~/corpus/**/*.jsonl"))
    'jsonl:~/corpus/**/*.jsonl'
  """
  kind, sep, target = str(text).partition(":")
  if not sep or kind not in SOURCE_KINDS or not target.strip():
    raise DataError(f"source={text!r} must be one of 'tfds:NAME[/CONFIG][:VERSION]', 'array_record:GLOB', "
                    "'parquet:GLOB', 'jsonl:GLOB'")
  return SourceSpec(kind, target.strip())


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """``"SOURCE=WEIGHT, SOURCE=WEIGHT, ..."`` -> ``[(source, weight / total), ...]``.

  The weight follows a source's last ``=``; weights are positive numbers, normalised to sum to 1.

  Example:
    >>> parse_mixture("tfds:c4/en=1, jsonl:/code/*.jsonl=1")
    [('tfds:c4/en', 0.5), ('jsonl:/code/*.jsonl', 0.5)]
  """
  items = [part.strip() for part in str(text).split(",") if part.strip()]
  if not items:
    raise DataError(f"mixture={text!r} must list SOURCE=WEIGHT items separated by commas")
  out = []
  for item in items:
    source, sep, weight = item.rpartition("=")
    try:
      w = float(weight)
    except ValueError:
      w = float("nan")
    if not sep or not math.isfinite(w) or w <= 0:
      raise DataError(f"mixture item {item!r} must be SOURCE=WEIGHT with a positive weight")
    parse_source(source.strip())
    out.append((source.strip(), w))
  total = sum(w for _, w in out)
  return [(s, w / total) for s, w in out]


def match_source_files(spec: SourceSpec) -> list[str]:
  """Sorted absolute paths of the regular files a glob source matches (``**`` recursive, ``~``).

  Example:
    >>> match_source_files(parse_source("parquet:/nowhere/*.parquet"))
    Traceback (most recent call last):
    ...
    memjax.data.errors.DataError: source 'parquet:/nowhere/*.parquet' matched no files
  """
  files = sorted(os.path.abspath(p) for p in glob_lib.glob(os.path.expanduser(spec.target), recursive=True)
                 if os.path.isfile(p))
  if not files:
    raise DataError(f"source '{spec}' matched no files")
  return files


def shard_files(files: Sequence[Any], process_index: int, process_count: int) -> tuple[list, int, int]:
  """This process's files and document shard ``(files, doc_index, doc_count)``: its own files
  ``files[process_index::process_count]`` when every process gets one, else all files and a document
  shard ``(process_index, process_count)``.

  Example:
    >>> shard_files(["a", "b", "c", "d"], 0, 2)
    (['a', 'c'], 0, 1)
  """
  if len(files) >= process_count:
    return list(files[process_index::process_count]), 0, 1
  return list(files), process_index, process_count


def block_permutation(block_sizes: Sequence[int], seed: int, epoch: int) -> np.ndarray:
  """The document order of one epoch of a block-structured source (Parquet row groups): blocks in a
  random order, rows within each block in a random order; a permutation of ``range(sum(sizes))``.

  Example:
    >>> sorted(block_permutation([2, 3], seed=0, epoch=0).tolist())
    [0, 1, 2, 3, 4]
  """
  rng = np.random.default_rng([seed, epoch, 0x6d656d])
  starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]]).astype(np.int64)
  parts = [starts[b] + rng.permutation(int(block_sizes[b])) for b in rng.permutation(len(block_sizes))]
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def record_value(record: Any, key: str, tokens: bool, where: str):
  """The text (``str``) or int32 token ids of ``record[key]``: a dict (JSON / Parquet row) or a
  serialized ``tf.train.Example``; ``DataError`` naming ``where`` and the fields present otherwise.

  Example:
    >>> record_value(b'{"text": "hi", "ids": [4, 5]}', "ids", True, "f.jsonl").tolist()
    [4, 5]
    >>> record_value({"body": "x"}, "text", False, "f.parquet")
    Traceback (most recent call last):
    ...
    memjax.data.errors.DataError: f.parquet: no field 'text' (fields: ['body'])
  """
  if isinstance(record, (bytes, bytearray, memoryview)):
    record = bytes(record)
    if record[:1] == b"{":
      try:
        record = json.loads(record)
      except ValueError:
        raise DataError(f"{where}: a record starting with '{{' is not valid JSON") from None
    else:
      return _example_value(record, key, tokens, where)
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if key not in record:
    raise DataError(f"{where}: no field {key!r} (fields: {sorted(record)[:20]})")
  value = record[key]
  if tokens:
    try:
      ids = np.asarray(value)
    except Exception:  # noqa: BLE001
      ids = np.zeros(0, object)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
      raise DataError(f"{where}: field {key!r} must be a list of token ids, got {type(value).__name__}")
    return ids.astype(np.int32)
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  if not isinstance(value, str):
    raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
  return value


_EXAMPLE = None


def _example_value(blob: bytes, key: str, tokens: bool, where: str):
  global _EXAMPLE
  if _EXAMPLE is None:
    from tensorflow_datasets.proto import tf_example_pb2
    _EXAMPLE = tf_example_pb2.Example
  try:
    example = _EXAMPLE.FromString(blob)
  except Exception:  # noqa: BLE001 - protobuf's DecodeError
    raise DataError(f"{where}: a record is neither a tf.train.Example nor a JSON object") from None
  features = example.features.feature
  if key not in features:
    raise DataError(f"{where}: no field {key!r} (fields: {sorted(features)[:20]})")
  feature = features[key]
  if tokens:
    if feature.WhichOneof("kind") != "int64_list":
      raise DataError(f"{where}: field {key!r} must be an int64 list of token ids, got {feature.WhichOneof('kind')}")
    return np.asarray(feature.int64_list.value, np.int32)
  if feature.WhichOneof("kind") != "bytes_list" or not feature.bytes_list.value:
    raise DataError(f"{where}: field {key!r} must be a text (bytes) feature, got {feature.WhichOneof('kind')}")
  return feature.bytes_list.value[0].decode("utf-8", errors="replace")


# ----- random-access readers (picklable, for Grain worker processes) -------------------------

class _Fields:
  """A random-access source of records -> their text / token values (``record_value``)."""

  def __init__(self, records, key: str, tokens: bool, name: str):
    self._records, self._key, self._tokens, self._name = records, key, tokens, name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int):
    return record_value(self._records[index], self._key, self._tokens, f"source '{self._name}'")


def line_index(path: str, chunk_bytes: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
  """``([start, end) byte spans [L, 2], 1-based line numbers [L])`` of the non-blank lines of a file,
  read in chunks of ``chunk_bytes`` (a large JSONL file is never held in memory whole).

  Example:
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...   _ = f.write(b'{"a": 1}\\n  \\n{"b": 2}')
    >>> spans, lines = line_index(f.name)
    >>> spans.tolist(), lines.tolist()
    ([[0, 9], [12, 20]], [1, 3])
  """
  spans, numbers = [], []
  base, lineno, carry = 0, 0, b""
  with open(path, "rb") as f:
    while True:
      chunk = f.read(chunk_bytes)
      buf = carry + chunk
      if not buf:
        break
      arr = np.frombuffer(buf, np.uint8)
      newlines = np.flatnonzero(arr == 10)
      if chunk:  # more may follow: only lines ended by a newline are complete
        if not len(newlines):
          carry = buf
          continue
        ends = newlines + 1
      else:  # end of file: the rest is the last line
        ends = np.concatenate([newlines + 1, [len(buf)]]) if len(newlines) == 0 or newlines[-1] + 1 < len(buf) \
            else newlines + 1
      starts = np.concatenate([[0], ends[:-1]])
      solid = np.concatenate([[0], np.cumsum(~np.isin(arr, (9, 10, 13, 32)), dtype=np.int64)])
      keep = solid[ends] > solid[starts]
      spans.append(np.stack([starts[keep], ends[keep]], 1).astype(np.int64) + base)
      numbers.append(lineno + 1 + np.flatnonzero(keep))
      lineno += len(ends)
      consumed = int(ends[-1])
      base += consumed
      carry = buf[consumed:]
      if not chunk:
        break
  if not spans:
    return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
  return np.concatenate(spans), np.concatenate(numbers).astype(np.int64)


class JsonlRecords:
  """Random access to the non-blank lines of JSONL files (a line-offset index built on opening)."""

  def __init__(self, files: Sequence[str], name: str):
    self._files = list(files)
    self._name = name
    offsets, counts, linenos = [], [], []
    for path in self._files:
      try:
        spans, numbers = line_index(path)
      except OSError as err:
        raise DataError(f"source '{name}': cannot read {path!r}: {err.strerror}") from None
      offsets.append(spans)
      linenos.append(numbers)
      counts.append(len(numbers))
    self._offsets = offsets
    self._linenos = linenos
    self._cum = np.cumsum([0] + counts)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return int(self._cum[-1])

  def __getitem__(self, index: int):
    f = int(np.searchsorted(self._cum, index, side="right") - 1)
    start, end = self._offsets[f][index - self._cum[f]]
    fd = self._fds.get(f)
    if fd is None:
      fd = self._fds[f] = os.open(self._files[f], os.O_RDONLY)
    line = os.pread(fd, int(end - start), int(start))
    if line[:3] == b"\xef\xbb\xbf":  # a BOM on the first line
      line = line[3:]
    try:
      return json.loads(line)
    except ValueError:
      lineno = self._linenos[f][index - self._cum[f]]
      raise DataError(f"source '{self._name}': {self._files[f]}:{lineno}: not valid JSON") from None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"] = {}
    return state


class ParquetRows:
  """Random access to one column of Parquet row groups (``units``: ``(file, row group)`` pairs), with a
  small cache of decoded row groups; ``block_sizes`` are the row groups' lengths."""

  def __init__(self, units: Sequence[tuple[str, int]], column: str, tokens: bool, name: str,
               num_rows: dict[tuple[str, int], int]):
    self._units, self._column, self._tokens, self._name = list(units), column, tokens, name
    self.block_sizes = [num_rows[u] for u in self._units]
    self._cum = np.cumsum([0] + self.block_sizes)
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._files: dict[str, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._cum[-1])

  def _block(self, b: int):
    with self._lock:
      hit = self._cache.get(b)
      if hit is not None:
        self._cache.move_to_end(b)
        return hit
      path, group = self._units[b]
      where = f"source '{self._name}': {path}"
      try:
        pf = self._files.get(path)
        if pf is None:
          import pyarrow.parquet as pq
          pf = self._files[path] = pq.ParquetFile(path)
        table = pf.read_row_group(group, columns=[self._column])
      except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid / OSError
        raise DataError(f"{where}: unreadable Parquet ({' '.join(str(err).split())[:120]})") from None
      col = table.column(0).combine_chunks()
      if self._tokens:
        import pyarrow as pa
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
          raise DataError(f"{where}: column {self._column!r} must be a list of token ids, got {col.type}")
        value = (col.offsets.to_numpy().astype(np.int64), col.values.to_numpy(zero_copy_only=False).astype(np.int32))
      else:
        value = col.to_pylist()
        if value and not isinstance(value[0], (str, bytes)):
          raise DataError(f"{where}: column {self._column!r} must be a string column, got {col.type}")
      self._cache[b] = value
      if len(self._cache) > _ROW_GROUP_CACHE:
        self._cache.popitem(last=False)
      return value

  def __getitem__(self, index: int):
    b = int(np.searchsorted(self._cum, index, side="right") - 1)
    value, row = self._block(b), int(index - self._cum[b])
    if self._tokens:
      offsets, values = value
      return values[offsets[row]:offsets[row + 1]]
    text = value[row]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else ("" if text is None else text)

  def __getstate__(self):
    state = {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_files", "_lock")}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()


@dataclasses.dataclass
class OpenedSource:
  """One process's view of a source: ``values`` (random access to text ``str`` / int32 token arrays),
  the document shard still to take (``doc_index``, ``doc_count``), ``block_sizes`` for a block
  shuffle (Parquet) or ``None`` for a global one, and what was read (``files``)."""

  name: str
  values: Any
  doc_index: int
  doc_count: int
  block_sizes: list[int] | None
  files: list[str]
  total_files: int


def _array_record(files: Sequence[str], name: str):
  import grain
  try:
    return grain.sources.ArrayRecordDataSource(list(files))
  except Exception as err:  # noqa: BLE001 - array_record raises RuntimeError / ValueError on bad files
    raise DataError(f"source '{name}': unreadable ArrayRecord shard among {len(files)} files "
                    f"({' '.join(str(err).split())[:160]})") from None


def _tfds_files(spec: SourceSpec, split: str, data_dir: str) -> list[str]:
  """The ``array_record`` files of a prepared TFDS split (``tfds.data_source``, ``download=False``)."""
  import tensorflow_datasets as tfds

  how = (f"prepare it first (memjax never downloads), e.g. `tfds build {spec.target.split(':')[0]} "
         f"--data_dir={data_dir} --file_format=array_record`")
  if not os.path.isdir(data_dir):
    raise DataError(f"source '{spec}': data_dir {data_dir!r} does not exist; {how}")
  try:
    ds = tfds.data_source(spec.target, split=split, data_dir=data_dir, download=False,
                          deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except Exception as err:  # noqa: BLE001 - DatasetNotFoundError, AssertionError (not prepared), bad split
    text = " ".join(str(err).split())
    if "split" in text.lower() and ("unknown" in text.lower() or "not found" in text.lower()):
      raise DataError(f"source '{spec}': no split {split!r} in {data_dir!r} ({text[:160]})") from None
    if "array_record" in text.lower() or "file_format" in text.lower():
      raise DataError(f"source '{spec}': not prepared as array_record in {data_dir!r}; rebuild it with "
                      f"`tfds build {spec.target.split(':')[0]} --data_dir={data_dir} --file_format=array_record`") from None
    name = spec.target.split(":")[0]
    found = os.path.join(data_dir, name)
    if "/" not in name and os.path.isdir(found):
      subdirs = sorted(d for d in os.listdir(found) if os.path.isdir(os.path.join(found, d)))
      configs = [d for d in subdirs if not d[:1].isdigit()]
      if configs:
        raise DataError(f"source '{spec}': {found} holds the configs {configs[:10]}; name one, e.g. "
                        f"'tfds:{name}/{configs[0]}'") from None
    raise DataError(f"source '{spec}': no prepared dataset {spec.target!r} in data_dir {data_dir!r}; {how}") from None
  info = ds.dataset_info
  if split not in info.splits:
    raise DataError(f"source '{spec}': no split {split!r}; the dataset has {sorted(info.splits)}")
  return sorted(os.fspath(p) for p in info.splits[split].filepaths)


def tfds_splits(spec: SourceSpec, data_dir: str) -> list[str]:
  """The split names of a prepared TFDS dataset (read from its ``dataset_info.json``; ``[]`` if none).

  Example:
    >>> tfds_splits(parse_source("tfds:c4/en"), "/nowhere")
    []
  """
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(spec.target, data_dir=data_dir)
    return sorted(builder.info.splits)
  except Exception:  # noqa: BLE001
    return []


def open_source(spec: SourceSpec | str, *, split: str = "train", text_key: str = "text",
                tokens_key: str | None = None, data_dir: str, process_index: int = 0,
                process_count: int = 1) -> OpenedSource:
  """Opens this process's shard of a source (see the module doc); reads one record to check the key.

  Example:
    >>> src = open_source("jsonl:/data/*.jsonl", data_dir="/tmp")  # doctest: +SKIP
    >>> src.values[0]                                               # doctest: +SKIP
    'the text of some document'
  """
  spec = parse_source(spec) if isinstance(spec, str) else spec
  tokens = tokens_key is not None
  key = tokens_key if tokens else text_key
  name = str(spec)
  block_sizes = None
  if spec.kind == "tfds":
    all_files = _tfds_files(spec, split, os.fspath(data_dir))
  else:
    all_files = match_source_files(spec)
  if spec.kind in ("tfds", "array_record"):
    files, di, dc = shard_files(all_files, process_index, process_count)
    values = _Fields(_array_record(files, name), key, tokens, name)
  elif spec.kind == "jsonl":
    files, di, dc = shard_files(all_files, process_index, process_count)
    values = _Fields(JsonlRecords(files, name), key, tokens, name)
  else:  # parquet: shard by file, else by row group, else by document
    import pyarrow.parquet as pq
    num_rows, units_of = {}, {}
    for path in all_files:
      try:
        meta = pq.ParquetFile(path).metadata
      except Exception as err:  # noqa: BLE001
        raise DataError(f"source '{name}': unreadable Parquet shard {path!r} "
                        f"({' '.join(str(err).split())[:120]})") from None
      columns = meta.schema.to_arrow_schema().names
      if key not in columns:
        raise DataError(f"source '{name}': {path} has no column {key!r} (columns: {columns[:20]})")
      units_of[path] = [(path, g) for g in range(meta.num_row_groups) if meta.row_group(g).num_rows]
      num_rows.update({(path, g): meta.row_group(g).num_rows for g in range(meta.num_row_groups)})
    files, di, dc = shard_files(all_files, process_index, process_count)
    units = [u for path in files for u in units_of[path]]
    if dc > 1:
      all_units = [u for path in all_files for u in units_of[path]]
      if len(all_units) >= process_count:
        units, di, dc = all_units[process_index::process_count], 0, 1
        files = sorted({p for p, _ in units})
      else:
        units = all_units
    values = ParquetRows(units, key, tokens, name, num_rows)
    block_sizes = values.block_sizes if dc == 1 else None
  if len(values) == 0:
    raise DataError(f"source '{name}' has no documents in {len(files)} files")
  values[0]  # a wrong key or an unreadable record fails now, in one line, not inside the pipeline
  return OpenedSource(name=name, values=values, doc_index=di, doc_count=dc, block_sizes=block_sizes,
                      files=list(files), total_files=len(all_files))
