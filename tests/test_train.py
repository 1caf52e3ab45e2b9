"""The training system end to end on the tiny config: resume equals never stopping, restore onto
another mesh, the CLI's exit codes, metrics.jsonl, the parameters-only export."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from memjax.run_config import config_from_dict
from memjax.trainer import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, **train):
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path / "data")
  for k, v in train.items():
    c.train[k] = v
  return config_from_dict(c)


def _leaves(workdir):
  from memjax.checkpoint import Checkpointer
  ckpt = Checkpointer(str(workdir))
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(ckpt.directory, str(step), "state"))
  ckpt.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(tree)]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {int(r["step"]): r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_is_identical_to_never_stopping(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  r1 = run(_cfg(tmp_path), str(straight), progress=False)
  assert r1.step == 8
  part = run(_cfg(tmp_path), str(resumed), progress=False, max_steps=3)
  assert part.step == 3
  r2 = run(_cfg(tmp_path), str(resumed), progress=False)  # resumes from step 3
  assert r2.step == 8
  step_a, leaves_a = _leaves(straight)
  step_b, leaves_b = _leaves(resumed)
  assert step_a == step_b == 8
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  la, lb = _losses(straight), _losses(resumed)
  assert set(la) <= set(lb) and all(la[k] == lb[k] for k in la)  # resumed also logs step 3
  assert {"qa_exact_match", "kl", "used", "val_loss"} <= set(r1.metrics)


def test_metrics_jsonl_has_the_contract_fields(tmp_path):
  run(_cfg(tmp_path), str(tmp_path / "w"), progress=False)
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  for r in train:
    assert {"step", "loss", "tokens_per_s", "lr", "value_lr"} <= set(r)
    assert r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
  final = [r for r in records if "qa_exact_match" in r][-1]
  assert 0.0 <= final["qa_exact_match"] <= 1.0 and 0.0 < final["used"] <= 1.0 and final["kl"] >= 0
  # Per-attribute scores: one per attribute of the scored items, averaging (by count) to the total.
  from memjax.data import load_qa_items
  items = load_qa_items(tmp_path / "data", "tiny")[:16]  # the tiny config scores its first 16 facts
  counts = {a: sum(it.attribute == a for it in items) for a in {it.attribute for it in items}}
  by_attr = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("qa_exact_match/")}
  assert set(by_attr) == set(counts) and len(counts) == 6
  assert sum(by_attr[a] * n for a, n in counts.items()) / 16 == pytest.approx(final["qa_exact_match"])
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "w" / "tb"))


RESTORE_8 = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from memjax import sharding
    from memjax.checkpoint import load_exported
    results = {{}}
    for name, sizes in [("data8", dict(data=8, fsdp=1, memory=1)), ("column", dict(data=2, fsdp=1, memory=4)),
                        ("fsdp", dict(data=4, fsdp=2, memory=1))]:
      mesh = sharding.make_mesh(sizes)
      model, cfg = load_exported({export!r}, mesh)
      values = model.blocks[1].ffn.values.values[...]
      results[name] = dict(
          devices=len(values.sharding.device_set),
          shard_shape=list(values.sharding.shard_shape(values.shape)),
          checksum=float(np.asarray(values, np.float64).sum()),
          logits=np.asarray(model(np.arange(16, dtype=np.int32).reshape(2, 8))[0]).tolist())
    print(json.dumps(results))
""")


def test_export_restores_onto_8_devices_and_other_meshes(tmp_path):
  workdir = tmp_path / "w"
  run(_cfg(tmp_path), str(workdir), progress=False)
  from memjax.checkpoint import load_exported
  model, _ = load_exported(str(workdir / "export"))
  want_values = np.asarray(model.blocks[1].ffn.values.values[...], np.float64)
  want_logits = np.asarray(model(np.arange(16, dtype=np.int32).reshape(2, 8))[0])
  out = subprocess.run([sys.executable, "-c", RESTORE_8.format(repo=REPO, export=str(workdir / "export"))],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for name, r in results.items():
    assert r["checksum"] == float(want_values.sum()), name
    np.testing.assert_allclose(np.array(r["logits"]), want_logits, rtol=1e-4, atol=1e-4, err_msg=name)
  assert results["data8"]["devices"] == 8
  assert results["column"]["shard_shape"] == [256, 8]  # value_dim 32 split over memory=4


def _train_cli(tmp_path, *flags, timeout=600):
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
         f"--config.data.data_dir={tmp_path / 'data'}", *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


def test_cli_trains_and_reports(tmp_path):
  out = _train_cli(tmp_path, f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done: step 8" in out.stdout and "qa_exact_match" in out.stdout


@pytest.mark.parametrize("flag,field", [
    ("--config.train.steps=0", "train.steps"),
    ("--config.model.memory.k=99", "model.memory.k"),
    ("--config.model.memory.value_update=lazy", "model.memory.value_update"),
    ("--config.mesh.data=3", "mesh"),
])
def test_cli_bad_values_exit_2_with_one_line(tmp_path, flag, field):
  out = _train_cli(tmp_path, f"--workdir={tmp_path / 'w'}", flag)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and field in lines[0], out.stderr
  assert "Traceback" not in out.stderr


def test_sigterm_saves_and_a_rerun_resumes_on_8_devices(tmp_path):
  import signal
  import time
  workdir = tmp_path / "w"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
         f"--config.data.data_dir={tmp_path / 'data'}", f"--workdir={workdir}", "--config.train.steps=100000",
         "--config.train.log_every=1"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "received SIGTERM" in err and "Traceback" not in err
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps and steps[-1] >= 3
  # Resume the same workdir on 8 fake devices (data=8): the checkpoint reshards onto the new mesh.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run(cmd[:-2] + [f"--config.train.steps={steps[-1] + 2}", "--config.mesh.data=8"],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resumed from {workdir / 'checkpoints'}/{steps[-1]}" in out.stdout
  assert f"done: step {steps[-1] + 2}" in out.stdout
