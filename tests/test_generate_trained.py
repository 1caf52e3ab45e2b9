"""On a trained tiny run: QA decoded with the KV cache predicts what the window re-run predicts, and
``python -m memjax.generate`` streams text from a workdir or an export, with one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import one_error_line, subprocess_env, tiny_config
from memjax.train.loop import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  cfg = tiny_config(root / "data", steps=30)
  run(cfg, str(root / "run"), progress=False)
  return cfg, str(root / "run")


def test_qa_with_the_kv_cache_predicts_what_the_window_rerun_predicts(trained):
  import jax.numpy as jnp
  from flax import nnx

  from memjax.data.qa import kv_cache_greedy, load_qa_items, qa_exact_match
  from memjax.generate import load_workdir, tokenizer_of
  cfg, workdir = trained
  model, saved, _ = load_workdir(workdir)
  tok = tokenizer_of(saved, os.path.join(workdir, "export"))
  items = load_qa_items(cfg.data.resolved_data_dir, cfg.data.kb)[:24]
  logits_fn = lambda t: np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(t)))
  kw = dict(batch_size=8, seq_len=64, max_answer_tokens=10, return_predictions=True)
  rerun = qa_exact_match(logits_fn, items, tok, **kw)
  cached = qa_exact_match(None, items, tok, greedy_fn=kv_cache_greedy(model, eos_id=tok.eos_id), **kw)
  assert cached["predictions"] == rerun["predictions"]
  assert len({p["prediction"] for p in rerun["predictions"]}) > 1  # not one degenerate string for all


def test_generate_cli_from_workdir_and_export(trained, tmp_path, capsys):
  from memjax.generate import main
  _, workdir = trained
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Mara was born in\n\nThe\n")
  assert main([f"--export={workdir}/export", f"--prompts_file={prompts}", "--json", "--max_new_tokens=6"]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [l["prompt"] for l in lines] == ["Mara was born in", "The"]
  assert main([f"--workdir={workdir}", "--prompt=Mara was born in", "--prompt=The", "--max_new_tokens=6"]) == 0
  text = capsys.readouterr().out.splitlines()
  assert text == [l["prompt"] + l["completion"] for l in lines]  # workdir == export, streamed == batched


def test_generate_cli_bad_input_is_one_line_exit_2(trained, tmp_path):
  _, workdir = trained
  bad = tmp_path / "bad"
  shutil.copytree(os.path.join(workdir, "export"), bad)
  raw = json.loads((bad / "config.json").read_text())
  raw["model"]["mlp_dim"] *= 2
  (bad / "config.json").write_text(json.dumps(raw))
  cases = [
      ([f"--workdir={tmp_path}/none", "--prompt=x"], "no checkpoint"),
      ([f"--export={bad}", "--prompt=x"], "do not match config.json"),
      ([f"--export={workdir}/export", "--prompt=" + "x" * 80], "longer than the model's window of 64"),
      ([f"--export={workdir}/export", "--prompt=x", "--top_p=2"], "--top_p=2.0 must be in (0, 1]"),
      ([f"--export={workdir}/export", "--prompt=x", "--backend=gpu"], "invalid choice: 'gpu'"),
  ]
  script = ("import json, sys; from memjax.command import run_command; from memjax.generate import main; "
            "cases = json.loads(sys.argv[1])\n"
            "for argv in cases:\n"
            "  try:\n    run_command(lambda: main(argv))\n  except SystemExit as e:\n    print('rc', e.code)\n")
  out = subprocess.run([sys.executable, "-c", script, json.dumps([a for a, _ in cases])], capture_output=True,
                       text=True, env=subprocess_env(), timeout=300)
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert "memjax/generate.py" not in out.stderr, out.stderr[-3000:]  # no traceback through the command
  assert [l for l in out.stdout.splitlines() if l.startswith("rc")] == ["rc 2"] * len(cases), out.stderr
  assert len(errors) == len(cases), out.stderr[-3000:]
  for line, (_, want) in zip(errors, cases):
    assert want in line, line
  # And the real entry point: one line, exit 2.
  proc = subprocess.run([sys.executable, "-m", "memjax.generate", "--prompt=x"], capture_output=True, text=True,
                        env=subprocess_env(), timeout=120)
  assert proc.returncode == 2 and "--workdir --export is required" in one_error_line(proc.stderr)
