"""Preemption on a pod, done right: 2 processes x 4 fake CPU devices (``jax.distributed`` on 127.0.0.1).

* SIGTERM to one process stops both at the same step with one checkpoint (exit 143); restarting both
  gives the losses and final parameters of an uninterrupted 2-process run, bit for bit.
* kill -9 of one process (the coordinator, process 0, or process 1): the other exits by itself with
  code 1 and one line naming the lost process, within ``--lost_process_timeout`` (+ a margin); no
  step is left half-finished; restarting both is bit-exact.
* A damaged newest checkpoint: both processes fall back to the same step.
* Resuming with another number of processes is refused with one line, or restarts the data
  iterators with ``--reshard_data``.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import pytest

from helpers import (CONFIGS, TRAIN_PY, checkpoint_steps, checkpoint_tree, launch_train_processes, logged_losses,
                     one_error_line, orbax_tmp_dirs, subprocess_env, without_device_count)

STEPS, EVERY, LOST_AFTER = 16, 4, 8
FLAGS = [f"--config={CONFIGS}/tiny.py", f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
         "--config.train.log_every=1", f"--lost_process_timeout={LOST_AFTER}"]


def _flags(data_dir):
  return FLAGS + [f"--config.data.data_dir={data_dir}"]


def _finish(procs, timeout=300):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
      p.kill()
      outs.append(p.communicate())
  return [p.returncode for p in procs], [o[1] for o in outs]


def _run_to_end(data_dir, workdir, **kw):
  codes, errs = _finish(launch_train_processes(_flags(data_dir) + kw.pop("extra", []), workdir, **kw))
  assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)


def _wait_for_records(workdir, n, procs, timeout=300):
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and open(metrics).read().count("\n") >= n:
      return
    time.sleep(0.1)
  raise AssertionError(f"{workdir}: {n} records not logged in time")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data")
  from memjax.data import make_pipeline
  make_pipeline(seq_len=64, batch_size=8, kb="tiny", data_dir=str(path))  # prepared once, before any run
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("reference") / "w"
  _run_to_end(data_dir, workdir)
  return workdir


def _assert_same_run(workdir, reference):
  assert logged_losses(workdir) == logged_losses(reference)
  assert checkpoint_steps(workdir)[-1] == STEPS
  chex.assert_trees_all_equal(checkpoint_tree(workdir), checkpoint_tree(reference))


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path, data_dir, reference):
  workdir = tmp_path / "w"
  procs = launch_train_processes(_flags(data_dir), workdir)
  _wait_for_records(workdir, 6, procs)
  procs[1].send_signal(signal.SIGTERM)
  codes, errs = _finish(procs, timeout=120)
  assert codes == [143, 143], errs
  stopped = [int(e.split("received SIGTERM at step ")[1].split(":")[0]) for e in errs]
  assert stopped[0] == stopped[1] and checkpoint_steps(workdir)[-1] == stopped[0]  # one step, one checkpoint
  _run_to_end(data_dir, workdir)
  _assert_same_run(workdir, reference)


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator", "process1"])
def test_a_lost_process_ends_the_other_with_one_line_and_a_restart_is_exact(tmp_path, data_dir, reference, victim):
  workdir = tmp_path / "w"
  procs = launch_train_processes(_flags(data_dir), workdir)
  _wait_for_records(workdir, 6, procs)
  procs[victim].kill()
  t0 = time.time()
  survivor = procs[1 - victim]
  _, err = survivor.communicate(timeout=LOST_AFTER + 60)
  waited = time.time() - t0
  procs[victim].wait()
  assert survivor.returncode == 1, err[-3000:]
  line = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("error: ")]
  assert len(line) == 1 and f"process {victim}" in line[0] and "was lost" in line[0], err[-3000:]
  assert "Traceback" not in err and "Check failure" not in err and "@ 0x" not in err
  assert waited <= LOST_AFTER + 15, waited
  assert not any(n.isdigit() and not (workdir / "checkpoints" / n / "state").is_dir()
                 for n in os.listdir(workdir / "checkpoints"))  # nothing half-written counts as a step
  _run_to_end(data_dir, workdir)
  assert not orbax_tmp_dirs(workdir / "checkpoints")
  _assert_same_run(workdir, reference)


@pytest.mark.parametrize("alone", [0, 1], ids=["coordinator_alone", "process1_alone"])
def test_a_process_lost_before_start_up_ends_the_other_after_the_startup_timeout(tmp_path, data_dir, alone):
  import portpicker
  env = without_device_count(subprocess_env())
  cmd = [sys.executable, TRAIN_PY, *_flags(data_dir), f"--workdir={tmp_path / 'w'}", "--num_processes=2",
         f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}", f"--process_id={alone}",
         "--num_cpu_devices=4", "--startup_timeout=3"]
  t0 = time.time()
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 1, out.stderr[-2000:]
  line = one_error_line(out.stderr)
  assert f"process {1 - alone}" in line and "was lost" in line, line
  assert time.time() - t0 < 3 + 60  # the timeout, plus starting Python and JAX on a loaded machine


def test_a_damaged_newest_checkpoint_falls_back_on_both_processes(tmp_path, data_dir, reference):
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "export")
  with open(workdir / "checkpoints" / str(STEPS) / "state" / "_METADATA", "w") as f:
    f.write("{garbage")
  procs = launch_train_processes(_flags(data_dir), workdir)
  codes, errs = _finish(procs)
  assert codes == [0, 0], errs
  for err in errs:  # both name the same fallback
    assert f"falling back from unreadable checkpoint step {STEPS} to step {STEPS - EVERY}" in err, err[-2000:]
  _assert_same_run(workdir, reference)  # steps 13-16 replayed from step 12, bit for bit


def test_another_process_count_is_refused_or_restarts_the_data(tmp_path, data_dir, reference):
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  cmd = [sys.executable, TRAIN_PY, *_flags(data_dir), f"--workdir={workdir}", f"--config.train.steps={STEPS + 2}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 2, out.stderr[-2000:]
  line = one_error_line(out.stderr)
  assert "--num_processes" in line and "written by 2 processes" in line and "--reshard_data" in line
  out = subprocess.run(cmd + ["--reshard_data"], capture_output=True, text=True, timeout=300,
                       env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "this run has 1" in out.stderr and f"done: step {STEPS + 2}" in out.stdout
