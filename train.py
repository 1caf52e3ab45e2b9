"""Train a memjax language model.

  python train.py                                   # configs/default.py: small Memory+ on the knowledge base
  python train.py --config=configs/memory_plus.py --workdir=runs/mp --config.train.steps=200

Re-running the same command resumes from the workdir's latest checkpoint. Bad flags or config
values exit with code 2 and one line naming the field; SIGTERM / SIGINT save and exit with 128+signal.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ imports from any cwd

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Path to a configs/*.py file; override fields with --config.<section>.<field>=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics.jsonl, TensorBoard and export.")


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; use --flag=value", file=sys.stderr)
    return 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from memjax import cli
  return cli.train_main(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
