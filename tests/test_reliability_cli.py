"""Bad input gets one clear line, never a JAX traceback: exit code 2 and one stderr line naming the field,
and nothing written to the workdir.

Three paths, all through the real entry point:
  * ``BAD_CONFIGS``: ``memjax.train.main.train_main`` in-process on a modified ``configs/tiny.py`` dict
    (every config section: types, ranges, choices, unknown keys, files);
  * ``BAD_COMMAND_LINES``: ``python train.py ...`` in a subprocess, most of them the README's form
    (no ``--config``: the default config plus ``--config.<key>=VALUE``);
  * a property-based test (hypothesis) of ``memjax.train.main.main(argv)`` in-process: unknown keys at
    every depth and unparsable values for every typed key.
"""

import contextlib
import io
import json
import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import tiny
from helpers import CONFIGS, one_error_line, subprocess_env, train_py
from memjax.config_bridge import leaf_types, schema
from memjax.train import main as cli

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
    # model.peer
    ({"model.peer.num_experts": 1000}, "model.peer.num_experts"),
    ({"model.peer.layers": "0", "model.peer.num_experts": 64, "model.peer.top_k": 9}, "model.peer.top_k"),
    ({"model.peer.activation": "tanh"}, "model.peer.activation"),
    ({"model.peer.layers": "1"}, "model.peer.layers"),  # overlaps model.memory.layers
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


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_input")
  with open(path / "bad.jsonl", "w") as f:
    f.write(json.dumps({"prompt": "Q: a?", "answer": "b"}) + "\n{not json\n")
  (path / "no_get_config.py").write_text("X = 1\n")
  (path / "raises.py").write_text("def get_config():\n  raise RuntimeError('broken on purpose')\n")
  (path / "syntax.py").write_text("def get_config(:\n")
  return path


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[",".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_exits_2_with_one_line_naming_the_field(tmp, capsys, overrides, field):
  code = cli.train_main(_raw(tmp, overrides), str(tmp / "w"))
  err = capsys.readouterr().err
  assert code == 2, err
  line = one_error_line(err)
  assert field in line, line
  assert not os.path.exists(tmp / "w"), "bad input writes nothing to the workdir"


def test_unwritable_workdir_is_refused(tmp, capsys):
  (tmp / "file.txt").write_text("a file, not a directory")  # root ignores chmod; a file parent stops it
  code = cli.train_main(_raw(tmp, {}), str(tmp / "file.txt" / "sub"))
  line = one_error_line(capsys.readouterr().err)
  assert code == 2 and "--workdir" in line and "not writable" in line, line


# (flags, text the line must contain, fake devices, with --config=configs/tiny.py). Without --config the
# default config is used, as the README shows; its data dir is the test's.
BAD_COMMAND_LINES = [
    # the four commands: unknown keys at every depth, without --config
    (["--config.train.stepz=3"], "--config.train.stepz", None, False),
    (["--config.model.memory.nkeys=4"], "--config.model.memory.nkeys", None, False),
    (["--config.data.text_globb=x"], "--config.data.text_globb", None, False),
    (["--config.nosuch.key=1"], "--config.nosuch.key", None, False),
    # values
    (["--config.train.steps=abc"], "--config.train.steps", None, False),
    (["--config.train.steps=0"], "train.steps", None, False),
    (["--config.model.memory.k=99"], "model.memory.k", None, False),
    (["--config.model.memory.value_update=lazy"], "model.memory.value_update", None, False),
    (["--config.model.memory.swilu=maybe"], "--config.model.memory.swilu", None, False),
    (["--config.mesh.data=3"], "mesh", None, False),
    (["--config.train"], "--config.train", None, False),
    (["--config.data.text_glob={tmp}/nothing/*.txt"], "nothing", None, False),
    (["--config.mesh.memory=4", "--config.model.memory.value_dim=30"], "model.memory.value_dim", 4, False),
    (["--config.mesh.data=4", "--config.train.batch_size=6"], "train.batch_size", 4, False),
    # flags and config files
    (["--no_such_flag=1"], "no_such_flag", None, False),
    (["extra_positional"], "unexpected arguments", None, False),
    (["--config=/no/such/config.py"], "/no/such/config.py", None, False),
    (["--config={tmp}/no_get_config.py"], "get_config", None, False),
    (["--config={tmp}/raises.py"], "broken on purpose", None, False),
    (["--config={tmp}/syntax.py"], "SyntaxError", None, False),
    (["--config.trian.steps=3"], "--config.trian.steps", None, True),
    (["--config.mesh.memory=4", "--config.model.memory.value_sharding=row", "--config.model.memory.n_keys=15",
      "--config.model.memory.k=4"], "model.memory.n_keys", 4, True),
    (["--num_processes=2"], "--num_processes", None, True),
]


@pytest.mark.parametrize("flags,field,devices,with_config", BAD_COMMAND_LINES,
                         ids=["_".join(f)[:60] for f, *_ in BAD_COMMAND_LINES])
def test_bad_command_lines_exit_2_with_one_line(tmp, flags, field, devices, with_config):
  workdir = tmp / "w_cli"
  env = subprocess_env(**({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices else {}))
  cmd = train_py(*[f.format(tmp=tmp) for f in flags], config="tiny" if with_config else None,
                 data_dir=tmp / "data", workdir=workdir)
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp))
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert field in one_error_line(out.stderr)
  assert not os.path.exists(workdir), "bad input writes nothing to the workdir"


def test_most_subprocess_cases_use_the_readme_form():
  assert sum(not with_config for *_, with_config in BAD_COMMAND_LINES) >= len(BAD_COMMAND_LINES) / 2


# ----- property-based: the real entry point, in-process ------------------------------------------------

SECTIONS = {"": schema()}


def _sections(tree, prefix=""):
  for key, sub in tree.items():
    if isinstance(sub, dict):
      SECTIONS[prefix + key] = sub
      _sections(sub, prefix + key + ".")


_sections(schema())
LEAVES = leaf_types()
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


@st.composite
def unknown_keys(draw):
  """A dotted key that is not a field: an unknown name in any section, or a path through a field."""
  section = draw(st.sampled_from(sorted(SECTIONS)))
  name = draw(_NAME.filter(lambda n: n not in SECTIONS[section]))
  key = f"{section}.{name}" if section else name
  if draw(st.booleans()):  # deeper still
    key += "." + draw(_NAME)
  return key


NOT_INT = st.sampled_from(["abc", "1.5", "", "1e3", "two", "0x", "--"])
NOT_FLOAT = st.sampled_from(["abc", "", "1,5", "one", "1..2"])
NOT_BOOL = st.sampled_from(["maybe", "2", "yesno", "", "tru"])


@st.composite
def wrong_values(draw):
  """A typed key and a value its type cannot parse."""
  typed = {k: t for k, t in LEAVES.items() if t in (int, float, bool)}
  key = draw(st.sampled_from(sorted(typed)))
  value = draw({int: NOT_INT, float: NOT_FLOAT, bool: NOT_BOOL}[typed[key]])
  return key, value


def _main(tmp_path, *flags):
  err = io.StringIO()
  workdir = tmp_path / "never"
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["train.py", *flags, f"--workdir={workdir}"])
  return code, err.getvalue(), workdir


@settings(max_examples=60, deadline=None)
@given(key=unknown_keys(), value=st.sampled_from(["1", "x", "true"]), with_config=st.booleans())
def test_unknown_keys_at_any_depth_exit_2(tmp_path_factory, key, value, with_config):
  tmp = tmp_path_factory.getbasetemp()
  flags = ([f"--config={CONFIGS}/tiny.py"] if with_config else []) + [f"--config.{key}={value}"]
  code, err, workdir = _main(tmp, *flags)
  assert code == 2, err
  assert f"--config.{key}" in one_error_line(err)
  assert not workdir.exists()


@settings(max_examples=60, deadline=None)
@given(case=wrong_values(), with_config=st.booleans())
def test_unparsable_values_for_every_typed_key_exit_2(tmp_path_factory, case, with_config):
  key, value = case
  tmp = tmp_path_factory.getbasetemp()
  flags = ([f"--config={CONFIGS}/tiny.py"] if with_config else []) + [f"--config.{key}={value}"]
  code, err, workdir = _main(tmp, *flags)
  assert code == 2, err
  line = one_error_line(err)
  assert key in line, line
  assert not workdir.exists()
