"""Every command line of the project answers bad input with one ``error:`` line and exit code 2:
the benchmark scripts, ``python -m memjax.plan`` and ``python -m memjax.demo`` (``train.py``:
``test_reliability_cli.py``): an unknown flag and a bad value each; an abbreviated flag is not guessed."""

import subprocess
import sys

import pytest

from helpers import REPO, one_error_line, subprocess_env

SCRIPTS = [["benchmarks/data_pipeline.py"], ["benchmarks/embedding_bag.py"], ["benchmarks/kill_soak.py"],
           ["benchmarks/knowledge.py"], ["benchmarks/scaling.py"], ["benchmarks/step_time.py"], ["benchmarks/topk.py"], ["benchmarks/row_grads.py"],
           ["benchmarks/step_profile.py"], ["benchmarks/topk_compile.py"], ["benchmarks/attention_compile.py"],
           ["benchmarks/plan_check.py", "--config=configs/tiny.py"], ["-m", "memjax.plan", "--config=configs/tiny.py"],
           ["-m", "memjax.demo"], ["benchmarks/decode.py"], ["benchmarks/attribution.py"], ["benchmarks/decode_compile.py"],
           ["-m", "memjax.generate", "--export=x"], ["benchmarks/continual.py"]]
VALUES = {"benchmarks/data_pipeline.py": ["--repeats=many"], "benchmarks/embedding_bag.py": ["--rounds=many"],
          "benchmarks/kill_soak.py": ["--kills=many"], "benchmarks/knowledge.py": ["--steps=many"],
          "benchmarks/scaling.py": ["--steps=many"], "benchmarks/step_time.py": ["--repeats=many"],
          "benchmarks/plan_check.py": ["--devices=many"], "benchmarks/topk.py": ["--rounds=many"],
          "benchmarks/step_profile.py": ["--repeats=many"], "benchmarks/topk_compile.py": ["--k=many"], "benchmarks/attention_compile.py": ["--seq_len=many"],
          "benchmarks/row_grads.py": ["--rounds=many"], "memjax.plan": ["--mesh", "data=x"],
          "memjax.demo": ["--n_keys=many"], "benchmarks/decode.py": ["--steps=many"],
          "benchmarks/attribution.py": ["--facts=many"], "benchmarks/decode_compile.py": ["--n_keys=many"], "memjax.generate": ["--max_new_tokens=many"],
          "benchmarks/continual.py": ["--edits=many"]}


def _run(args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                        env=subprocess_env(JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s[-1] if s[0] != "-m" else s[1])
def test_unknown_flags_exit_2_with_one_line(script):
  out = _run(script + ["--no_such_flag=1"])
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "--no_such_flag" in one_error_line(out.stderr)


def test_abbreviated_flags_are_not_guessed():
  out = _run(["benchmarks/step_time.py", "--rep=2"])  # argparse would take it for --repeats
  assert out.returncode == 2 and "--rep" in one_error_line(out.stderr)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s[-1] if s[0] != "-m" else s[1])
def test_bad_values_exit_2_with_one_line(script):
  name = script[1] if script[0] == "-m" else script[0]
  out = _run(script + VALUES[name])
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "many" in one_error_line(out.stderr) or "data=x" in out.stderr


@pytest.mark.parametrize("argv,named", [(["benchmarks/step_profile.py", "--families=bogus"], "'bogus'"),
                                        (["benchmarks/topk_compile.py", "--targets=v9"], "'v9'"),
                                        (["benchmarks/attention_compile.py", "--targets=v9"], "'v9'"),
                                        (["benchmarks/continual.py", "--methods=sft"], "'sft'")])
def test_unknown_choices_are_named_with_the_allowed_ones(argv, named):
  out = _run(argv)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  line = one_error_line(out.stderr)
  assert named in line and "allowed" in line
