"""Every config in configs/ builds; the matched family really is matched in FLOPs per token."""

import importlib
import os

import pytest

from memjax.config_bridge import config_from_dict, config_to_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_round_trips(name):
  cfg = config_from_dict(importlib.import_module(f"configs.{name}").get_config())
  assert config_from_dict(config_to_dict(cfg)) == cfg


def _flops(name):
  cfg = config_from_dict(importlib.import_module(f"configs.{name}").get_config()).with_vocab(259)
  return cfg.model.flops_per_token(cfg.train.seq_len), cfg


def test_matched_family_flops_within_10_percent_of_dense():
  dense, _ = _flops("dense")
  for name in ("memory", "memory_plus", "moe", "peer"):
    flops, cfg = _flops(name)
    assert 0.9 * dense <= flops <= 1.1 * dense, (name, flops, dense)
  assert _flops("memory_plus")[1].model.memory.layers == (1, 3, 5)
  assert _flops("memory")[1].model.memory.layers == (3,)
  assert _flops("peer")[1].model.peer.layers == (3,)


def test_base_is_the_dataclass_defaults():
  # configs/base.py is derived from Config(): one source of defaults.
  from configs import base
  from memjax.config import Config
  assert config_from_dict(base.get_config()) == Config()
  assert config_from_dict({}) == Config()


def test_base_placeholders_accept_overrides():
  # Fields that default to None are typed placeholders: a ConfigDict assignment of their type works.
  from configs import base
  c = base.get_config()
  c.data.text_glob = "notes/*.md"
  c.model.memory.value_init_std = 0.5
  cfg = config_from_dict(c)
  assert cfg.data.text_glob == "notes/*.md" and cfg.model.memory.layer.value_init_std == 0.5


def test_parsing_a_config_imports_neither_tfds_nor_grain():
  import subprocess
  import sys
  code = ("import sys; from memjax.config_bridge import config_from_dict, load_config_file; "
          f"config_from_dict(load_config_file({os.path.join(CONFIG_DIR, 'default.py')!r})); "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow_datasets', 'grain', 'tensorflow')]; "
          "print(bad); assert not bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-2000:]
