"""What every memjax command line shares: bad input is one ``error: ...`` line and exit code 2.

``ArgumentParser`` is argparse's, except that a bad or missing argument raises ``CommandLineError``
(instead of printing usage and exiting); ``run_command(main)`` runs a command's ``main() -> int``,
turning ``CommandLineError`` / ``ConfigError`` / ``DataError`` into that line and exit 2. Used by
``python -m memjax.plan``, the benchmark scripts and the other commands; ``train.py`` has its own
flags (absl) but the same rule.

Example:
  >>> parser = ArgumentParser(prog="demo")
  >>> _ = parser.add_argument("--n", type=int, required=True)
  >>> try:
  ...   parser.parse_args(["--n", "x"])
  ... except CommandLineError as e:
  ...   print(e)
  argument --n: invalid int value: 'x'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class CommandLineError(ValueError):
  """A command line that cannot be run (unknown flag, bad value, missing argument): one line."""


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` raising ``CommandLineError`` instead of exiting with usage."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)  # --step must not silently mean --steps
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    raise CommandLineError(" ".join(message.split()))


def run_command(main: Callable[[], int | None]) -> None:
  """``sys.exit(main())``, with bad input as one ``error:`` line and exit 2."""
  from memjax.config import ConfigError
  from memjax.data.errors import DataError
  try:
    code = main()
  except (CommandLineError, ConfigError, DataError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    code = 2
  sys.exit(code or 0)
