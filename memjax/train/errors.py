"""The two ways a run ends early that are not bad input (``ConfigError`` / ``DataError``, exit 2)."""

from __future__ import annotations

import signal


class TrainingError(RuntimeError):
  """A run that cannot continue (non-finite loss, mismatched workdir, failed save, unreadable
  checkpoints); a one-line message, exit code 1."""


class Interrupted(Exception):
  """Raised after a checkpoint was saved because of SIGTERM / SIGINT; ``code`` is 128 + signal."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"received {signal.Signals(signum).name} at step {step}: checkpoint saved; "
                     "re-run the same command to resume")
    self.code = 128 + signum
    self.step = step
