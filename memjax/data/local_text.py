"""Train on any local text: a glob of files -> a TFDS dataset with ``train`` / ``validation`` splits.

Files and documents:

* ``.txt``, ``.md``, ``.py``: one document per file (UTF-8, a leading BOM is dropped).
* ``.jsonl``: one document per line, from its ``"text"`` string field; blank lines are ignored.
  A line that is not a JSON object with a string ``"text"`` raises ``DataError`` naming the file
  and line number.
* Other suffixes matched by the glob are ignored; a glob matching no supported file is an error.
* Undecodable bytes (not UTF-8) are **skipped and counted**, not fatal: a whole file for
  .txt/.md/.py, the line for .jsonl. Stray binary or Latin-1 files are common in globbed trees;
  the count and the first skipped paths are logged and stored in the dataset's
  ``info.metadata["skipped_undecodable"]`` / ``["skipped_paths"]``. If nothing usable remains the
  corpus is empty and that is a ``DataError``. Whitespace-only documents are skipped too.

Splits: each document has a key, its path relative to the glob's root (the directory part of the
glob before its first wildcard), plus ``#L<line>`` for a JSONL line. A document goes to
``validation`` when ``sha256(key)`` read as a fraction in [0, 1) is below ``validation_fraction``
(default ``VALIDATION_FRACTION = 0.05``, i.e. ~5 % of documents), otherwise to ``train``; adding or
removing files never moves the others. Hashing JSONL documents by line (not the whole file) keeps a
single large JSONL file from landing entirely in one split. Two fix-ups keep both splits usable:
with ``validation_fraction > 0``, >= 2 documents and none hashed to ``validation``, the one with the
smallest hash goes there; if ``train`` would be empty, the one with the largest hash goes back to
``train``. A one-document corpus (or ``validation_fraction=0``) has no ``validation`` split.

How the builder gets the glob: ``local_text_builder_config(text_glob)`` expands it and returns a
``LocalTextConfig`` named ``"g" + sha256(glob, validation_fraction, and each matched file's
relative path, size and mtime)[:16]``. The same files give the same name (and reuse the prepared
data under ``<data_dir>/memjax_local_text/<name>/1.0.0``); editing, adding or removing a file gives
a new name and a rebuild.

Example:
  >>> split_for_key("notes/a.md", 0.05), split_for_key("notes/a.md", 1.0)
  ('train', 'validation')
  >>> glob_root("/data/wiki/**/*.txt")
  '/data/wiki'
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import logging
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds

from memjax.config import VALIDATION_FRACTION
from memjax.data._tfds import code_path_of, quiet_prepare
from memjax.data.errors import DataError, jsonl_objects

SUPPORTED_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
_MAX_LISTED_SKIPS = 20

log = logging.getLogger(__name__)


def glob_root(text_glob: str) -> str:
  """The directory part of ``text_glob`` before its first wildcard (keys are relative to it)."""
  pattern = os.path.expanduser(text_glob)
  parts = pattern.split(os.sep)
  literal = []
  for part in parts[:-1]:
    if glob_lib.has_magic(part):
      break
    literal.append(part)
  root = os.sep.join(literal)
  if pattern.startswith(os.sep) and not root:
    root = os.sep
  return os.path.abspath(root or ".")


def match_files(text_glob: str) -> list[str]:
  """Sorted absolute paths of the regular files with a supported suffix that ``text_glob`` matches.

  ``**`` matches directories recursively; ``~`` expands. Raises ``DataError`` if nothing matches.
  """
  if not isinstance(text_glob, str) or not text_glob.strip():
    raise DataError(f"text_glob={text_glob!r} must be a non-empty glob pattern string")
  matched = [p for p in glob_lib.glob(os.path.expanduser(text_glob), recursive=True) if os.path.isfile(p)]
  if not matched:
    raise DataError(f"text_glob={text_glob!r} matched no files")
  files = sorted(os.path.abspath(p) for p in matched if p.endswith(SUPPORTED_SUFFIXES))
  if not files:
    raise DataError(f"text_glob={text_glob!r} matched {len(matched)} files but none with a supported suffix "
                    f"{list(SUPPORTED_SUFFIXES)}")
  return files


def split_for_key(key: str, validation_fraction: float) -> str:
  """``"validation"`` if the key's hash fraction is below ``validation_fraction``, else ``"train"``."""
  return "validation" if _hash_fraction(key) < validation_fraction else "train"


def _hash_fraction(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclasses.dataclass
class ScanStats:
  """What reading a corpus skipped (undecodable bytes, empty documents)."""

  undecodable: int = 0
  empty: int = 0
  skipped_paths: list[str] = dataclasses.field(default_factory=list)

  def skip(self, where: str) -> None:
    self.undecodable += 1
    if len(self.skipped_paths) < _MAX_LISTED_SKIPS:
      self.skipped_paths.append(where)


def iter_documents(path: str, root: str, stats: ScanStats | None = None) -> Iterator[tuple[str, str]]:
  """Yields ``(key, text)`` for each non-empty, decodable document of one file (see module doc)."""
  stats = stats if stats is not None else ScanStats()
  rel = os.path.relpath(path, root).replace(os.sep, "/")
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as err:
    raise DataError(f"cannot read {path!r}: {err.strerror}") from None
  if not path.endswith(".jsonl"):
    try:
      text = blob.decode("utf-8-sig")
    except UnicodeDecodeError:
      stats.skip(rel)
      return
    if text.strip():
      yield rel, text
    else:
      stats.empty += 1
    return
  expected = 'a JSON object with a string "text" field'
  for lineno, record in jsonl_objects(blob, path, on_undecodable=lambda n: stats.skip(f"{rel}:{n}"),
                                      expected=expected):
    if not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{lineno}: expected {expected}")
    if record["text"].strip():
      yield f"{rel}#L{lineno}", record["text"]
    else:
      stats.empty += 1


def assign_splits(keys: list[str], validation_fraction: float) -> dict[str, str]:
  """Maps each document key to its split (hash rule plus the two fix-ups in the module doc)."""
  frac = {k: _hash_fraction(k) for k in keys}
  split = {k: ("validation" if frac[k] < validation_fraction else "train") for k in keys}
  if validation_fraction > 0 and len(keys) >= 2 and "validation" not in split.values():
    split[min(keys, key=frac.__getitem__)] = "validation"
  if keys and "train" not in split.values():
    split[max(keys, key=frac.__getitem__)] = "train"
  return split


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """A glob expanded to a file list (TFDS ``BuilderConfig``); build it with ``local_text_builder_config``."""

  text_glob: str = ""
  root: str = ""
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation_fraction: float = VALIDATION_FRACTION


def _check_fraction(validation_fraction) -> None:
  if (isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float))
      or not 0.0 <= validation_fraction < 1.0):
    raise DataError(f"validation_fraction={validation_fraction!r} must be a float in [0, 1)")


def local_text_builder_config(text_glob: str, validation_fraction: float = VALIDATION_FRACTION) -> LocalTextConfig:
  """Expands the glob and names the config by a hash of the glob and the files (see module doc)."""
  _check_fraction(validation_fraction)
  files = match_files(text_glob)
  root = glob_root(text_glob)
  digest = hashlib.sha256(f"{text_glob}\0{validation_fraction!r}".encode())
  for path in files:
    st = os.stat(path)
    digest.update(f"\0{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return LocalTextConfig(
      name="g" + digest.hexdigest()[:16], text_glob=text_glob, root=root, files=tuple(files),
      validation_fraction=float(validation_fraction),
      description=f"{len(files)} files from text_glob={text_glob!r}")


class MemjaxLocalText(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of local text files (features ``text`` and ``key``); configs from a glob."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = code_path_of(__file__)  # see memjax.data._tfds
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files (.txt, .md, .py, .jsonl) matched by a glob.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "key": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    # Pass 1: keys only (the text is read again per split, so a large corpus is never held in memory).
    stats = ScanStats()
    keys = [key for path in cfg.files for key, _ in iter_documents(path, cfg.root, stats)]
    if not keys:
      raise DataError(
          f"text_glob={cfg.text_glob!r} gives an empty corpus: {len(cfg.files)} files matched, no non-empty "
          f"document ({stats.undecodable} skipped for undecodable bytes, {stats.empty} empty)")
    if stats.undecodable:
      log.warning("text_glob=%r: skipped %d documents with undecodable (non-UTF-8) bytes, e.g. %s",
                  cfg.text_glob, stats.undecodable, stats.skipped_paths[:3])
    split_of = assign_splits(keys, cfg.validation_fraction)
    counts = {s: sum(1 for v in split_of.values() if v == s) for s in ("train", "validation")}
    self.info.metadata.update({
        "text_glob": cfg.text_glob, "files": len(cfg.files), "documents": counts,
        "skipped_undecodable": stats.undecodable, "skipped_empty": stats.empty,
        "skipped_paths": list(stats.skipped_paths),
    })
    return {s: self._generate_examples(split=s, split_of=split_of) for s in counts if counts[s]}

  def _generate_examples(self, split, split_of):
    cfg = self.builder_config
    for path in cfg.files:
      for key, text in iter_documents(path, cfg.root):
        if split_of.get(key) == split:
          yield key, {"text": text, "key": key}


def prepare_local_text(data_dir: str | os.PathLike, text_glob: str,
                       validation_fraction: float = VALIDATION_FRACTION) -> MemjaxLocalText:
  """Builds (once per file set) and returns the local-text builder."""
  builder = MemjaxLocalText(config=local_text_builder_config(text_glob, validation_fraction),
                            data_dir=os.fspath(data_dir), file_format="array_record")
  quiet_prepare(builder)
  return builder
