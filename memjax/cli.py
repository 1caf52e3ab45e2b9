"""What ``train.py`` does after flag parsing: validate, run, and turn failures into one-line messages."""

from __future__ import annotations

import signal
import sys

from memjax.config import ConfigError


def train_main(raw_config, workdir: str) -> int:
  """Runs training; returns the process exit code.

  0 finished; 1 the run cannot continue (``TrainingError``: non-finite loss, failed save, unreadable or
  mismatched checkpoints; or an ``OSError`` from the environment); 2 bad input (``ConfigError`` /
  ``DataError``), with one line on stderr naming the field or file; 128 + n after signal n (SIGTERM /
  SIGINT save a checkpoint first).
  """
  from memjax.data.errors import DataError
  from memjax.run_config import config_from_dict
  from memjax.trainer import Interrupted, TrainingError, run

  try:
    cfg = config_from_dict(raw_config)
    result = run(cfg, workdir)
  except (ConfigError, DataError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    return e.code
  except KeyboardInterrupt:  # before the loop's handlers are installed (data preparation, compiling)
    print("interrupted before training started: nothing to save", file=sys.stderr)
    return 128 + signal.SIGINT
  except OSError as e:  # the environment, not the code: disk full, permissions, a vanished path
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 1
  m = result.metrics
  summary = [f"step {result.step}"]
  for key in ("loss", "val_loss", "qa_exact_match", "qa_chance", "kl", "used"):
    if key in m:
      summary.append(f"{key} {m[key]:.4g}")
  print("done: " + ", ".join(summary) + f"  (workdir {result.workdir})")
  return 0
