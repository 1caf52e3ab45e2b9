"""The training system end to end on the tiny config: resume equals never stopping, the CLI trains and
reports, metrics.jsonl holds the contract's fields, SIGTERM saves and a re-run resumes on 8 devices.
(The export restored onto other meshes: ``multidevice/test_export_meshes.py``.)"""

import dataclasses
import os
import signal
import subprocess

import numpy as np
import pytest

from helpers import (checkpoint_leaves, checkpoint_steps, logged_losses, records, start_and_wait_for_records,
                     subprocess_env, tiny_config, train_py)
from memjax.train.loop import run


def test_resume_is_identical_to_never_stopping(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r1 = run(tiny_config(tmp_path / "data"), str(straight), progress=False)
  assert r1.step == 8
  part = run(tiny_config(tmp_path / "data"), str(resumed), progress=False, max_steps=3)
  assert part.step == 3
  r2 = run(tiny_config(tmp_path / "data"), str(resumed), progress=False)  # resumes from step 3
  assert r2.step == 8
  assert checkpoint_steps(straight)[-1] == checkpoint_steps(resumed)[-1] == 8
  for a, b in zip(checkpoint_leaves(straight), checkpoint_leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  la, lb = logged_losses(straight), logged_losses(resumed)
  assert set(la) <= set(lb) and all(la[k] == lb[k] for k in la)  # resumed also logs step 3
  assert {"qa_exact_match", "kl", "used", "val_loss"} <= set(r1.metrics)


def test_metrics_jsonl_has_the_contract_fields(tmp_path):
  cfg = tiny_config(tmp_path / "data")
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kb_questions=True))
  run(cfg, str(tmp_path / "w"), progress=False)
  recs = records(tmp_path / "w")
  train = [r for r in recs if "loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  for r in train:
    assert {"step", "loss", "tokens_per_s", "lr", "value_lr"} <= set(r)
    assert r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
  final = [r for r in recs if "qa_exact_match" in r][-1]
  assert 0.0 <= final["qa_exact_match"] <= 1.0 and 0.0 < final["used"] <= 1.0 and final["kl"] >= 0
  assert 0.0 <= final["qa_question_exact_match"] <= 1.0 and final["qa_question_n"] == 16  # data.kb_questions
  # Per-attribute scores: one per attribute of the scored items, averaging (by count) to the total.
  from memjax.data import load_qa_items
  items = load_qa_items(tmp_path / "data", "tiny")[:16]  # the tiny config scores its first 16 facts
  counts = {a: sum(it.attribute == a for it in items) for a in {it.attribute for it in items}}
  by_attr = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("qa_exact_match/")}
  assert set(by_attr) == set(counts) and len(counts) == 6
  assert sum(by_attr[a] * n for a, n in counts.items()) / 16 == pytest.approx(final["qa_exact_match"])
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "w" / "tb"))


def test_cli_trains_and_reports(tmp_path):
  out = subprocess.run(train_py(data_dir=tmp_path / "data", workdir=tmp_path / "w"), capture_output=True, text=True,
                       timeout=600, cwd=str(tmp_path), env=subprocess_env())
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done: step 8" in out.stdout and "qa_exact_match" in out.stdout


def test_sigterm_saves_and_a_rerun_resumes_on_8_devices(tmp_path):
  workdir = tmp_path / "w"
  cmd = train_py("--config.train.steps=100000", "--config.train.log_every=1", data_dir=tmp_path / "data",
                 workdir=workdir)
  proc = start_and_wait_for_records(cmd, workdir, 3, cwd=str(tmp_path), env=subprocess_env())
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "received SIGTERM" in err and "Traceback" not in err
  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] >= 3
  # Resume the same workdir on 8 fake devices (data=8): the checkpoint reshards onto the new mesh.
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(cmd[:-2] + [f"--config.train.steps={steps[-1] + 2}", "--config.mesh.data=8"],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resumed from {workdir / 'checkpoints'}/{steps[-1]}" in out.stdout
  assert f"done: step {steps[-1] + 2}" in out.stdout
