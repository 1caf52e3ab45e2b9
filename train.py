"""Train a memjax language model.

  python train.py                                   # configs/default.py: small Memory+ on the knowledge base
  python train.py --config=configs/memory_plus.py --workdir=runs/mp --config.train.steps=200

Multi-process (one process per host; see the README's scale-out section):

  python train.py --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...
  python train.py --distributed ...          # TPU pod slices / SLURM / Kubernetes: auto-detected

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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed.initialize (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with no arguments (auto-detects TPU pod "
    "slices, SLURM, Open MPI, Kubernetes); implied by --coordinator_address.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Fake CPU devices in this process (testing multi-device runs on one host).")


def init_distributed() -> str | None:
  """Sets up devices and ``jax.distributed`` from the flags, before any JAX computation.

  Returns an error message for inconsistent flags (None if fine)."""
  import jax
  given = [f for f, v in (("--coordinator_address", _COORDINATOR.value), ("--num_processes", _NUM_PROCESSES.value),
                          ("--process_id", _PROCESS_ID.value)) if v is not None]
  if given and len(given) != 3 and not (_DISTRIBUTED.value and len(given) == 1 and given[0] == "--coordinator_address"):
    return (f"{', '.join(given)} given without the others: pass --coordinator_address, --num_processes and "
            "--process_id together (or --distributed to auto-detect)")
  if _NUM_PROCESSES.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    return f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes={_NUM_PROCESSES.value})"
  if _NUM_CPU_DEVICES.value is not None:
    if _NUM_CPU_DEVICES.value < 1:
      return f"--num_cpu_devices={_NUM_CPU_DEVICES.value} must be a positive int"
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  if given:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  return None


def main(argv) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; use --flag=value", file=sys.stderr)
    return 2
  error = init_distributed()
  if error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from memjax import cli
  return cli.train_main(_CONFIG.value, _WORKDIR.value)


def _message(e) -> str:
  if isinstance(e, (KeyError, AttributeError)) and e.args:  # ml_collections nests a KeyError's text
    return _message(e.args[0]) if isinstance(e.args[0], BaseException) else str(e.args[0])
  return str(e)


def _flag_error(argv, e: BaseException) -> None:
  """Exits 2 with one line for a flag absl or ml_collections rejects (instead of usage or a traceback)."""
  import re
  text = " ".join(_message(e).split())
  if isinstance(e, (KeyError, AttributeError)):  # an unknown --config.<section>.<field>: name the flag
    names = re.findall(r"'(\w+)'", text)
    culprit = next((a.split("=", 1)[0] for a in argv[1:] for name in names if a.startswith("--config.")
                    and re.search(rf"\.{name}(\.|$)", a.split("=", 1)[0])), None)
    text = f"{culprit or '--config'}: not a known field ({text})"
  print(f"error: {text}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _flag_error(argv, e)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
    _flag_error(argv, e)  # ml_collections: an unknown --config.<field>, a config file that fails to load


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
