"""Bad input gets one clear line, never a JAX traceback: exit code 2 and one stderr line naming the field.

Most cases call ``memjax.cli.train_main`` in-process on a modified ``configs/tiny.py`` dict (fast); the
cases absl or ml_collections reject while parsing flags, and those needing several devices, run
``train.py`` in a subprocess.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from memjax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (dotted field -> value overrides, text the error line must contain)
BAD_CONFIGS = [
    # model
    ({"model.dim": "wide"}, "model.dim"),
    ({"model.dim": 0}, "model.dim"),
    ({"model.num_layers": -1}, "model.num_layers"),
    ({"model.head_dim": 15}, "model.head_dim"),
    ({"model.dtype": "float64"}, "model.dtype"),
    ({"model.tie_embeddings": "yes"}, "model.tie_embeddings"),
    ({"model.rope_theta": -1.0}, "model.rope_theta"),
    ({"model.vocab_size": -5}, "model.vocab_size"),
    ({"model.widht": 3}, "model.widht"),
    # model.memory
    ({"model.memory.k": 99}, "model.memory.k"),
    ({"model.memory.key_dim": 15}, "model.memory.key_dim"),
    ({"model.memory.n_keys": 0}, "model.memory.n_keys"),
    ({"model.memory.heads": "4"}, "model.memory.heads"),
    ({"model.memory.value_sharding": "diagonal"}, "model.memory.value_sharding"),
    ({"model.memory.value_update": "lazy"}, "model.memory.value_update"),
    ({"model.memory.value_dtype": "int8"}, "model.memory.value_dtype"),
    ({"model.memory.layers": "7"}, "model.memory.layers"),
    ({"model.memory.layers": "centered:9"}, "model.memory.layers"),
    ({"model.memory.n_keyz": 4}, "model.memory.n_keyz"),
    # model.moe
    ({"model.moe.layers": "0", "model.moe.top_k": 9}, "model.moe.top_k"),
    ({"model.moe.capacity_factor": 0.0}, "model.moe.capacity_factor"),
    ({"model.moe.layers": "1"}, "model.moe.layers"),  # overlaps model.memory.layers
    # train
    ({"train.steps": 0}, "train.steps"),
    ({"train.batch_size": "8"}, "train.batch_size"),
    ({"train.lr": -1.0}, "train.lr"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.b1": 1.5}, "train.b1"),
    ({"train.decay": "exponential"}, "train.decay"),
    ({"train.nan_policy": "ignore"}, "train.nan_policy"),
    ({"train.stepz": 3}, "train.stepz"),
    # mesh (one CPU device in this process)
    ({"mesh.data": 0}, "mesh.data"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh"),
    ({"mesh.data": 3}, "mesh"),
    ({"mesh.data": 1, "mesh.memory": 2}, "mesh"),
    # data
    ({"data.kb": "huge"}, "data.kb"),
    ({"data.tokenizer": "wordpiece"}, "data.tokenizer"),
    ({"data.validation_fraction": 1.5}, "data.validation_fraction"),
    ({"data.bpe_vocab_size": 10, "data.tokenizer": "bpe"}, "data.bpe_vocab_size"),
    ({"data.text_glob": "{tmp}/no_such_dir/*.txt"}, "no_such_dir"),
    # eval
    ({"eval.qa_batch_size": 0}, "eval.qa_batch_size"),
    ({"eval.eval_batches": -1}, "eval.eval_batches"),
    ({"eval.qa_jsonl": "{tmp}/missing.jsonl"}, "missing.jsonl"),
    ({"eval.qa_jsonl": "{tmp}/bad.jsonl"}, "bad.jsonl:2"),
    # top level
    ({"optim": {"lr": 1.0}}, "config.optim"),
]


def _raw(tmp, overrides: dict) -> dict:
  raw = tiny.get_config().to_dict()
  raw["data"]["data_dir"] = str(tmp / "data")
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
      node = node[p]
    node[leaf] = value.format(tmp=tmp) if isinstance(value, str) else value
  return raw


def _one_error_line(stderr: str) -> str:
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
  return lines[0]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_input")
  with open(path / "bad.jsonl", "w") as f:
    f.write(json.dumps({"prompt": "Q: a?", "answer": "b"}) + "\n{not json\n")
  return path


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[",".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_the_field(tmp, capsys, overrides, field):
  code = cli.train_main(_raw(tmp, overrides), str(tmp / "w"))
  err = capsys.readouterr().err
  assert code == 2, err
  line = _one_error_line(err)
  assert field in line, line
  assert not os.path.exists(tmp / "w" / "checkpoints"), "nothing may start training"


def test_unwritable_workdir_is_refused(tmp, capsys):
  (tmp / "file.txt").write_text("a file, not a directory")  # root ignores chmod; a file parent stops it
  code = cli.train_main(_raw(tmp, {}), str(tmp / "file.txt" / "sub"))
  line = _one_error_line(capsys.readouterr().err)
  assert code == 2 and "--workdir" in line and "not writable" in line, line


def _train_py(tmp, *flags, devices=None):
  env = dict(os.environ)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
         f"--config.data.data_dir={tmp / 'data'}", f"--workdir={tmp / 'w_cli'}", *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp))


@pytest.mark.parametrize("flags,field,devices", [
    (["--config.train.stepz=3"], "--config.train.stepz", None),  # unknown override key (ml_collections)
    (["--config.trian.steps=3"], "--config.trian.steps", None),  # unknown section
    (["--config.train.steps=abc"], "--config.train.steps", None),  # a string for an int (absl)
    (["--no_such_flag=1"], "no_such_flag", None),
    (["--config=/no/such/config.py"], "/no/such/config.py", None),
    (["extra_positional"], "unexpected arguments", None),
    # The memory axis splits value_dim in column mode: 30 columns over 4 devices is refused before jit.
    (["--config.mesh.memory=4", "--config.model.memory.value_dim=30"], "model.memory.value_dim", 4),
    (["--config.mesh.memory=4", "--config.model.memory.value_sharding=row", "--config.model.memory.n_keys=15",
      "--config.model.memory.k=4"], "model.memory.n_keys", 4),
    (["--config.mesh.data=4", "--config.train.batch_size=6"], "train.batch_size", 4),
], ids=["unknown-field", "unknown-section", "string-for-int", "unknown-flag", "missing-config-file",
        "positional", "value-dim-vs-mesh", "slots-vs-mesh", "batch-vs-mesh"])
def test_bad_flags_exit_2_with_one_line(tmp, flags, field, devices):
  out = _train_py(tmp, *flags, devices=devices)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  line = _one_error_line(out.stderr)
  assert field in line, line
