"""What ``train.py`` does after flag parsing: validate, run, and turn failures into one-line messages."""

from __future__ import annotations

import sys

from memjax.config import ConfigError


def train_main(raw_config, workdir: str) -> int:
  """Runs training; returns the process exit code (0 ok, 1 training error, 2 bad input, 128+n signal)."""
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
  m = result.metrics
  summary = [f"step {result.step}"]
  for key in ("loss", "val_loss", "qa_exact_match", "qa_chance", "kl", "used"):
    if key in m:
      summary.append(f"{key} {m[key]:.4g}")
  print("done: " + ", ".join(summary) + f"  (workdir {result.workdir})")
  return 0
