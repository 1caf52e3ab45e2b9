"""Interruptions are non-events: kill -9 and re-run gives the uninterrupted run bit-for-bit; SIGINT saves;
damaged checkpoints fall back to the previous good step; a mismatched workdir, a failed save and a
non-finite loss stop with one clear line and leave earlier checkpoints restorable."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import (checkpoint_leaves, checkpoint_tree, logged_losses, orbax_tmp_dirs, records,
                     start_and_wait_for_records, tiny_config, tiny_raw, train_py)
from memjax.train import main as cli
from memjax.train.checkpoint import Checkpointer
from memjax.train.errors import TrainingError
from memjax.train.loop import run, truncate_log


def _params(workdir, step):
  tree = checkpoint_tree(workdir, step)
  return {"params": tree["params"], "values": tree["values"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


# ----- kill -9 and resume ---------------------------------------------------------------------------

STEPS, EVERY = 12, 2


def test_two_sigkills_then_rerun_equal_an_uninterrupted_run(tmp_path, data_dir):
  reference = tmp_path / "reference"
  run(tiny_config(data_dir, steps=STEPS, checkpoint_every=EVERY, log_every=1), str(reference), progress=False)
  workdir = tmp_path / "killed"
  cmd = train_py(f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
                 "--config.train.log_every=1", data_dir=data_dir, workdir=workdir)
  metrics, ckpt_dir = workdir / "metrics.jsonl", workdir / "checkpoints"

  # Kill 1: mid-training, once 5 step records are logged (checkpoints 2 and 4 exist, 5 is past them).
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not (
      metrics.exists() and metrics.read_text().count("\n") >= 5):
    time.sleep(0.01)
  assert proc.poll() is None, proc.stderr.read()[-2000:]
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL

  # Kill 2: mid-checkpoint-write, the moment an Orbax temporary directory appears.
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  caught = False
  while proc.poll() is None and time.time() < deadline:
    if orbax_tmp_dirs(ckpt_dir):
      proc.kill()
      caught = True
      break
    time.sleep(0.001)
  proc.wait()
  assert caught, "the run ended before a checkpoint write was caught"
  assert orbax_tmp_dirs(ckpt_dir), "the kill should leave a half-written checkpoint behind"

  # The same command again: resumes from the last finished checkpoint and completes.
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from" in out.stdout and f"done: step {STEPS}" in out.stdout
  assert not orbax_tmp_dirs(ckpt_dir), "the temporary directory of the killed save is cleaned up"
  assert logged_losses(workdir) == logged_losses(reference)  # every step logged once, bit-identical losses
  chex.assert_trees_all_equal(checkpoint_tree(workdir), checkpoint_tree(reference))


def test_truncate_log_keeps_records_up_to_the_restored_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "val_loss": 3.0}\n'
                  '{"step": 3, "loss": 4.0}\n{"step": 4, "lo')
  assert truncate_log(str(path), 2) == 2  # step 3 and the torn line
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 2]
  assert truncate_log(str(path), 2, drop_final_eval=True) == 1  # the finished run's evaluation repeats
  assert truncate_log(str(path), 2) == 0
  path.write_text('{"step": 1, "loss": 1.0}')  # whole, but the kill came before its newline
  assert truncate_log(str(path), 2) == 0 and path.read_text().endswith("}\n")


# ----- signals --------------------------------------------------------------------------------------


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, data_dir):
  workdir = tmp_path / "w"
  cmd = train_py("--config.train.steps=100000", "--config.train.log_every=1", data_dir=data_dir, workdir=workdir)
  proc = start_and_wait_for_records(cmd, workdir, 3)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
  assert "received SIGINT" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
  steps = Checkpointer(str(workdir)).all_steps()
  assert steps and steps[-1] >= 3
  assert max(logged_losses(workdir)) == steps[-1]  # the log reaches exactly the saved step


# ----- damaged checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, data_dir):
  """A finished 6-step run with checkpoints 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("six") / "w"
  run(tiny_config(data_dir, steps=6, checkpoint_every=2), str(workdir), progress=False)
  assert Checkpointer(str(workdir)).all_steps() == [2, 4, 6]
  return workdir


def _truncate_biggest_array_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state")) for f in names
           if os.sep + "d" + os.sep in os.path.join(root, f)]
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{garbage")


@pytest.mark.parametrize("damage", [_truncate_biggest_array_file, _garble_metadata],
                         ids=["truncated-array-file", "corrupted-metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, capsys, six_steps, data_dir, damage):
  workdir = tmp_path / "w"
  shutil.copytree(six_steps, workdir)
  damage(str(workdir / "checkpoints" / "6"))
  code = cli.train_main(tiny_raw(data_dir, steps=8, checkpoint_every=2), str(workdir))
  captured = capsys.readouterr()
  assert code == 0, captured.err
  fallback = [l for l in captured.err.splitlines() if "falling back" in l]
  assert len(fallback) == 1 and "step 6" in fallback[0] and "step 4" in fallback[0], captured.err
  assert "resumed from" in captured.out and captured.out.split("resumed from")[1].split()[0].endswith("/4")
  assert os.listdir(workdir / "checkpoints.damaged")[0].startswith("6-")  # moved aside, not deleted
  assert Checkpointer(str(workdir)).all_steps()[-1] == 8
  assert sorted(logged_losses(workdir)) == [2, 4, 6, 8]  # the replayed steps 5, 6 logged once


def test_no_readable_checkpoint_refuses_instead_of_restarting(tmp_path, capsys, six_steps, data_dir):
  workdir = tmp_path / "w"
  shutil.copytree(six_steps, workdir)
  for step in (2, 4, 6):
    _garble_metadata(str(workdir / "checkpoints" / str(step)))
  code = cli.train_main(tiny_raw(data_dir, steps=8), str(workdir))
  err = capsys.readouterr().err
  assert code == 1, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: no checkpoint") and "move the workdir aside" in last, err
  assert Checkpointer(str(workdir)).all_steps() == [2, 4, 6]  # nothing moved, nothing overwritten
  assert "Traceback" not in err


def test_an_empty_step_directory_is_not_silently_restarted(tmp_path, capsys, data_dir):
  workdir = tmp_path / "w"
  os.makedirs(workdir / "checkpoints" / "4")  # a step directory with nothing in it
  code = cli.train_main(tiny_raw(data_dir), str(workdir))
  err = capsys.readouterr().err
  assert code == 1 and "move the workdir aside" in err and "step 4" in err, err
  assert os.path.isdir(workdir / "checkpoints" / "4") and not os.path.exists(workdir / "metrics.jsonl")


# ----- mismatched workdir ---------------------------------------------------------------------------


def test_resuming_with_another_model_shape_is_refused_naming_the_field(tmp_path, six_steps, data_dir):
  workdir = tmp_path / "w"
  shutil.copytree(six_steps, workdir)
  cmd = train_py("--config.train.steps=8", "--config.model.dim=48", data_dir=data_dir, workdir=workdir)
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "model.dim: saved 32, now 48" in lines[0], out.stderr
  assert Checkpointer(str(workdir)).all_steps() == [2, 4, 6]


# ----- numerics -------------------------------------------------------------------------------------

ABSURD_LR = dict(lr=1e12, warmup_steps=0, checkpoint_every=1, log_every=1)  # step 1 fine, step 2 NaN


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, data_dir):
  workdir = tmp_path / "w"
  code = cli.train_main(tiny_raw(data_dir, steps=4, **ABSURD_LR), str(workdir))
  err = capsys.readouterr().err
  assert code == 1, err
  assert "non-finite loss or gradient at step 2" in err and "Traceback" not in err
  assert Checkpointer(str(workdir)).all_steps() == [1]  # the NaN step was never saved
  assert all(np.isfinite(x).all() for x in checkpoint_leaves(workdir, 1))


def test_nan_policy_skip_keeps_the_params_and_continues(tmp_path, data_dir):
  workdir = tmp_path / "w"
  cfg = tiny_config(data_dir, steps=4, nan_policy="skip", max_checkpoints=10, **ABSURD_LR)
  result = run(cfg, str(workdir), progress=False)
  assert result.step == 4  # training went on past the non-finite steps
  skipped = [int(r["step"]) for r in records(workdir) if r.get("skipped")]
  assert 2 in skipped
  for step in skipped:  # a skipped step leaves parameters and values exactly as they were
    chex.assert_trees_all_equal(_params(workdir, step), _params(workdir, step - 1))
  first = next(r for r in records(workdir) if int(r["step"]) == 1)
  assert not first.get("skipped") and first["grad_norm"] > 0  # step 1 did update, so equality is not vacuous


# ----- disk -----------------------------------------------------------------------------------------


def test_a_failed_save_is_reported_and_earlier_checkpoints_stay_restorable(tmp_path, monkeypatch, data_dir):
  workdir = tmp_path / "w"
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  cfg = tiny_config(data_dir, steps=6, checkpoint_every=2)
  with pytest.raises(TrainingError, match=r"checkpoint of step 4 failed \(No space left on device\); earlier"):
    run(cfg, str(workdir), progress=False)
  assert Checkpointer(str(workdir)).all_steps() == [2]
  assert all(np.isfinite(x).all() for x in checkpoint_leaves(workdir, 2))
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # disk freed: the same run resumes
  assert run(cfg, str(workdir), progress=False).step == 6
  assert sorted(logged_losses(workdir)) == [2, 4, 6]


# ----- asynchronous checkpoints -----------------------------------------------------------------------


def test_async_checkpoints_hold_what_synchronous_ones_hold(tmp_path, data_dir):
  for mode in (False, True):
    run(tiny_config(data_dir, steps=6, checkpoint_every=1, log_every=1, async_checkpoint=mode, max_checkpoints=10),
        str(tmp_path / str(mode)), progress=False)
  steps = Checkpointer(str(tmp_path / "True")).all_steps()
  assert steps == Checkpointer(str(tmp_path / "False")).all_steps() == [1, 2, 3, 4, 5, 6]
  for step in steps:  # the next step donates the state's buffers while the save is still being written
    chex.assert_trees_all_equal(checkpoint_tree(tmp_path / "True", step), checkpoint_tree(tmp_path / "False", step))
