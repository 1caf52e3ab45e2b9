"""Collectives of the compiled sharded train step (``memjax.scale.comms``): on (data=2, memory=4),
column mode never all-gathers the value table, row mode neither, for both value updates."""

import pytest

from helpers import tiny_raw
from memjax.config_bridge import config_from_dict
from memjax.scale import comms
from memjax.train.step import compile_train_step


@pytest.mark.parametrize("value_sharding", ["column", "row"])
@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_step_never_all_gathers_the_value_table(update, value_sharding):
  c = tiny_raw()
  c.model.memory.n_keys = 32  # 1024 slots: no activation of the tiny batch has the table's shape
  c.model.memory.value_update, c.model.memory.value_sharding = update, value_sharding
  c.train.seq_len = 32
  cfg = config_from_dict(c).with_vocab(259)
  compiled, _ = compile_train_step(cfg.model, cfg.train, dict(data=2, fsdp=1, memory=4))
  colls = comms.collectives(compiled)
  table = (cfg.model.memory.layer.num_slots, cfg.model.memory.layer.value_dim)
  assert [c.line for c in comms.gathers_of_shape(colls, table)] == []
  assert comms.summarize(colls), "a (data=2, memory=4) step must communicate"
