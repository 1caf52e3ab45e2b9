"""The one exception type the data package raises for bad inputs.

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
