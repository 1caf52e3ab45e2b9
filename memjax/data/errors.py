"""The one exception type the data package raises for bad inputs, and the JSONL reader that names them.

Every ``DataError`` message is a single line that names the offending thing: the glob, the file
(and line number), or the config field and the values allowed.

Example:
  >>> try:
  ...   raise DataError("qa.jsonl:3: not a JSON object")
  ... except ValueError as err:
  ...   print(err)
  qa.jsonl:3: not a JSON object
"""

from __future__ import annotations


class DataError(ValueError):
  """A data input memjax cannot use (no files, empty corpus, malformed line, bad config value)."""

  def __init__(self, message: str):
    # One line, always: callers build messages from paths and reprs, so fold any stray newline.
    super().__init__(" ".join(str(message).split("\n")))


def jsonl_objects(blob: bytes, path: str, on_undecodable=None, expected: str = "a JSON object"):
  """Yields ``(line number, dict)`` for each non-blank line of a JSONL file's bytes.

  A line that is not UTF-8 is passed to ``on_undecodable(lineno)`` and skipped, or (without one)
  raises ``DataError`` naming ``path:lineno``; a line that is not JSON, or not a JSON object (the
  message says ``expected``), raises ``DataError`` naming ``path:lineno`` (a BOM is allowed on the
  first line).

  Example:
    >>> list(jsonl_objects(b'{"a": 1}\\n\\n{"b": 2}', "f.jsonl"))
    [(1, {'a': 1}), (3, {'b': 2})]
  """
  import json

  for lineno, raw in enumerate(blob.split(b"\n"), 1):
    try:
      line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
      if on_undecodable is None:
        raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
      on_undecodable(lineno)
      continue
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as err:
      raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{lineno}: expected {expected}, got {type(record).__name__}")
    yield lineno, record
