"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import memjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(memjax.__path__, "memjax.")
                 if m.name not in ("memjax.demo",))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_public_api_is_documented():
  for name in memjax.__all__:
    obj = getattr(memjax, name)
    if callable(obj):
      assert obj.__doc__ and obj.__doc__.strip(), f"memjax.{name} has no docstring"


def test_demo_runs(capsys):
  from memjax import demo
  demo.main(["--n_keys", "16", "--k", "4", "--heads", "2", "--dim", "16", "--tokens", "64"])
  out = capsys.readouterr().out
  assert "equals brute force over all 256 slots on 64 tokens: True" in out
  assert "kl=" in out
