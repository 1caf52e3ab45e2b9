"""The ``train.py`` command: flags, config overrides, distributed initialisation, exit codes.

  python train.py                                   # configs/default.py: small Memory+ on the knowledge base
  python train.py --config=configs/memory_plus.py --workdir=runs/mp --config.train.steps=200

Multi-process (one process per host; see docs/scale-out.md):

  python train.py --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...
  python train.py --distributed ...          # TPU pod slices / SLURM / Kubernetes: auto-detected

Re-running the same command resumes from the workdir's latest checkpoint. With several processes,
SIGTERM or SIGINT to any of them stops all at the same step with one checkpoint; a process that dies
(kill -9, OOM, a lost host) ends the others within ``--lost_process_timeout`` seconds with exit code 1
and one line naming it (``memjax.train.distributed``); restarting every process resumes exactly.

Exit codes: 0 finished; 1 the run cannot continue (``TrainingError``: non-finite loss, failed save,
unreadable or mismatched checkpoints; or an ``OSError`` from the environment); 2 bad input (a flag,
a config file or value, data: ``ConfigError`` / ``DataError`` / a flag absl rejects), with one line
on stderr naming it, before anything is written; 128 + n after signal n (SIGTERM / SIGINT save a
checkpoint first).

``--config.<section>.<field>=VALUE`` overrides are handled here, not by ``ml_collections``'
``config_flags``: each VALUE is parsed by the type of the field it names (``config_bridge``), so an
unknown key or a bad value is one line and exit 2 with or without ``--config``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from absl import flags

import configs
from memjax.config import ConfigError
from memjax.config_bridge import apply_overrides, config_from_dict, load_config_file

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "default.py")

FLAGS = flags.FlagValues()  # this command's own flags (absl's global FLAGS stay untouched)
flags.DEFINE_string("config", DEFAULT_CONFIG, "Path to a configs/*.py file; override fields with "
                    "--config.<section>.<field>=VALUE.", flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics.jsonl, TensorBoard and export.",
                    flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed.initialize (multi-process runs).", flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).", flag_values=FLAGS)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with no arguments (auto-detects TPU "
                  "pod slices, SLURM, Open MPI, Kubernetes); implied by --coordinator_address.", flag_values=FLAGS)
flags.DEFINE_integer("num_cpu_devices", None, "Fake CPU devices in this process (testing multi-device runs on one "
                     "host).", flag_values=FLAGS)
flags.DEFINE_float("lost_process_timeout", 30.0, "Multi-process runs: seconds without a heartbeat after which a "
                   "process counts as lost; the others then exit with code 1 and one line naming it.",
                   flag_values=FLAGS)
flags.DEFINE_integer("startup_timeout", 120, "Multi-process runs: seconds for every process to connect to the "
                     "coordinator at start-up; a process lost before that ends the others after this long, with "
                     "exit code 1 and one line.", flag_values=FLAGS)
flags.DEFINE_bool("reshard_data", False, "Resume a checkpoint written by another number of processes: restore the "
                  "model and optimizer exactly and restart the data iterators (without it such a resume is "
                  "refused).", flag_values=FLAGS)

_CONFIG_PREFIX = "--config."


class UsageError(ValueError):
  """A command line that cannot be run: one line, exit 2."""


def split_config_overrides(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.<key>=VALUE`` (or ``--config.<key> VALUE``) overrides from the other flags."""
  rest, overrides = [], []
  args = list(args)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(_CONFIG_PREFIX):
      key, eq, value = arg[len(_CONFIG_PREFIX):].partition("=")
      if not eq:
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
          raise ConfigError(arg, rule=f": needs a value ({arg}=VALUE)")
        i += 1
        value = args[i]
      if not key:
        raise ConfigError(arg, rule=": names no field (use --config.<section>.<field>=VALUE)")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def parse_command_line(argv: Sequence[str]):
  """``argv`` -> the run's raw config (a nested dict, overrides applied); the other flags land in
  ``FLAGS``. Raises ``ConfigError`` (bad config file, key or value) or ``UsageError``."""
  rest, overrides = split_config_overrides(argv[1:])
  FLAGS.unparse_flags()  # defaults again: main() may run several times in one process (tests)
  try:
    positional = FLAGS([argv[0] if argv else "train.py", *rest])[1:]
  except flags.Error as e:
    raise UsageError(" ".join(str(e).split())) from None
  if positional:
    raise UsageError(f"unexpected arguments {positional}; use --flag=value")
  return apply_overrides(load_config_file(FLAGS.config), overrides)


def init_distributed() -> None:
  """Sets up devices and ``jax.distributed`` from the flags, before any JAX computation.

  Raises ``UsageError`` for inconsistent flags."""
  import jax
  given = [f for f, v in (("--coordinator_address", FLAGS.coordinator_address),
                          ("--num_processes", FLAGS.num_processes), ("--process_id", FLAGS.process_id))
           if v is not None]
  if given and len(given) != 3 and not (FLAGS.distributed and given == ["--coordinator_address"]):
    raise UsageError(f"{', '.join(given)} given without the others: pass --coordinator_address, --num_processes "
                     "and --process_id together (or --distributed to auto-detect)")
  if FLAGS.num_processes is not None and not 0 <= FLAGS.process_id < FLAGS.num_processes:
    raise UsageError(f"--process_id={FLAGS.process_id} must be in [0, --num_processes={FLAGS.num_processes})")
  if FLAGS.num_cpu_devices is not None:
    if FLAGS.num_cpu_devices < 1:
      raise UsageError(f"--num_cpu_devices={FLAGS.num_cpu_devices} must be a positive int")
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  if not FLAGS.lost_process_timeout > 0:
    raise UsageError(f"--lost_process_timeout={FLAGS.lost_process_timeout} must be a positive number of seconds")
  if not FLAGS.startup_timeout > 0:
    raise UsageError(f"--startup_timeout={FLAGS.startup_timeout} must be a positive number of seconds")
  if given or FLAGS.distributed:
    from memjax.train import distributed
    distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                           process_id=FLAGS.process_id, auto=not given, lost_after=FLAGS.lost_process_timeout,
                           init_timeout=FLAGS.startup_timeout)


def train_main(raw_config, workdir: str, *, reshard_data: bool = False) -> int:
  """Validates ``raw_config`` (a ConfigDict or nested dict), trains in ``workdir``; returns the exit code."""
  import jax

  from memjax.data.errors import DataError
  from memjax.train import distributed
  from memjax.train.errors import Interrupted, TrainingError
  from memjax.train.loop import run

  def fail(message: str, code: int) -> int:
    if distributed.multi_process():  # a normal exit would wait for peers stuck in a collective with us
      distributed.end_after_error(message, code)
    print(message, file=sys.stderr)
    return code

  try:
    cfg = config_from_dict(raw_config)
    result = run(cfg, workdir, process_count_change="restart_data" if reshard_data else "refuse")
  except (ConfigError, DataError) as e:
    return fail(f"error: {str(e).splitlines()[0]}", 2)
  except TrainingError as e:
    return fail(f"error: {e}", 1)
  except Interrupted as e:  # every process stops at this step: the peers are exiting too
    print(str(e), file=sys.stderr, flush=True)
    return distributed.finish(e.code)
  except KeyboardInterrupt:  # before the loop's handlers are installed (data preparation, compiling)
    return fail("interrupted before training started: nothing to save", 128 + signal.SIGINT)
  except OSError as e:  # the environment, not the code: disk full, permissions, a vanished path
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return fail(f"error: {e.strerror or e}{where}", 1)
  except jax.errors.JaxRuntimeError as e:
    if not distributed.multi_process():
      raise
    # A collective failed: most likely a peer died. Its watchdog verdict names it and ends this
    # process; if none comes, say what failed.
    distributed.wait_for_verdict()
    return fail(f"error: a collective with the other processes failed ({' '.join(str(e).split())[:200]})", 1)
  m = result.metrics
  summary = [f"step {result.step}"]
  for key in ("loss", "val_loss", "qa_exact_match", "qa_question_exact_match", "qa_chance", "kl", "used"):
    if key in m:
      summary.append(f"{key} {m[key]:.4g}")
  print("done: " + ", ".join(summary) + f"  (workdir {result.workdir})", flush=True)
  return distributed.finish(0)


def main(argv: Sequence[str] | None = None) -> int:
  """The whole command; returns its exit code (``train.py`` exits with it)."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(include_special_flags=False))
    return 0
  try:
    raw = parse_command_line(argv)
    config_from_dict(raw)  # every config error before any JAX set-up
    init_distributed()
  except (ConfigError, UsageError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl's global flags
    flags.FLAGS.mark_as_parsed()
  return train_main(raw, FLAGS.workdir, reshard_data=FLAGS.reshard_data)


def cli() -> None:
  """Entry point of ``train.py`` (a multi-process run's worker runs under ``supervise``)."""
  from memjax.train import supervise
  if supervise.needed(sys.argv):
    sys.exit(supervise.supervise(sys.argv))
  supervise.die_with_parent()
  sys.exit(main())


if __name__ == "__main__":  # the supervised worker: python -m memjax.train.main ...
  cli()
