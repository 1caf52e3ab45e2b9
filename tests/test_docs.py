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


# ----- the README and docs/ -------------------------------------------------------------------------

import pathlib  # noqa: E402
import re  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
  readme = (REPO / "README.md").read_text()
  block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
  assert block == ['pip install -e . && python train.py', 'pip install -e ".[dev]" && python -m pytest -q -n 2 tests']
  assert block[1] in (REPO / ".ci" / "run").read_text()


def test_every_local_link_and_doc_path_exists():
  texts = {p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
  for path, text in texts.items():
    for target in re.findall(r"\]\(([^)#]+)\)", text):  # markdown links
      if not target.startswith("http"):
        assert (path.parent / target).exists(), f"{path.name} links to a missing {target}"
    for ref in re.findall(r"\b((?:docs|tests|benchmarks|configs|memjax|notebooks)/[\w./-]+\.(?:md|py|ipynb|json|cc))", text):
      assert (REPO / ref).exists() or any(REPO.glob(ref)), f"{path.name} names a missing {ref}"


def test_config_doc_lists_every_key_with_its_default():
  from memjax.config import Config
  from memjax.config_bridge import config_to_dict, leaf_types
  doc = (REPO / "docs" / "config.md").read_text()
  rows = dict(re.findall(r"^\| `([\w.]+)` \| [^|]+(?:\\\|[^|]+)? \| `([^`]*)` \|", doc, re.M))
  values = config_to_dict(Config())
  for key in leaf_types():
    node = values
    for part in key.split("."):
      node = node[part]
    assert key in rows, f"docs/config.md has no row for {key}"
    assert rows[key] == repr(node), f"docs/config.md says {key} defaults to {rows[key]}, the code {node!r}"
  assert set(rows) == set(leaf_types()), set(rows) ^ set(leaf_types())
