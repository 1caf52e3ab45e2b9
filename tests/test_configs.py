"""Every config in configs/ builds; the matched family really is matched in FLOPs per token."""

import importlib
import os

import pytest

from memjax.run_config import config_from_dict, config_to_dict

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
  for name in ("memory", "memory_plus", "moe"):
    flops, cfg = _flops(name)
    assert 0.9 * dense <= flops <= 1.1 * dense, (name, flops, dense)
  assert _flops("memory_plus")[1].model.memory.layers == (1, 3, 5)
  assert _flops("memory")[1].model.memory.layers == (3,)
