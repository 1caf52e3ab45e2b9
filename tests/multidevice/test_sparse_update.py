"""The row-sparse value update on a mesh runs per shard (``optim.sharded_sparse_value_update``):
each device computes row gradients for its own batch shard and its own columns of the table, the
shards are merged over the batch axes into a buffer bounded by the rows the batch can read, and Adam
runs over it in chunks. Checked on XLA's compiled step: its HLO and ``memory_analysis()`` (no timing).
Equality with the 1-device run is in ``test_equivalence.py``.

Lookups dominate this model's temporaries: 16 x 64 tokens x 4 heads x k=8 = 32768 lookups, each row
gradient 128 floats (16 MiB per [lookups, Dv] fp32 buffer). With n_keys=256 the table has 65536 rows,
more than the lookups: the merged gradient is bounded by the lookups; with n_keys=32 (1024 rows) by
the table. ``update_chunk_rows=4096`` makes the sharded Adam loop run 8 chunks.
"""

import re

import jax
import pytest

from helpers import tiny_raw
from memjax.config_bridge import config_from_dict
from memjax.scale import comms
from memjax.train.step import compile_train_step

LOOKUPS, DV, MEMORY = 16 * 64 * 4 * 8, 128, 4
# "one" is the 1-device step with XLA's update (the formulation the sharded steps split);
# "one_fused" the 1-device step as it runs by default on CPU (train.fused_value_update).
LAYOUTS = {"one": (256, dict(data=1, fsdp=1, memory=1), 1),
           "one_fused": (256, dict(data=1, fsdp=1, memory=1), 1),
           "data8": (256, dict(data=8, fsdp=1, memory=1), None),
           "col_d2m4": (256, dict(data=2, fsdp=1, memory=4), None),
           "data8_small_table": (32, dict(data=8, fsdp=1, memory=1), None)}


def _cfg(n_keys, fused=False):
  c = tiny_raw(fused_value_update=fused)
  c.model.memory.n_keys, c.model.memory.heads, c.model.memory.k, c.model.memory.value_dim = n_keys, 4, 8, 128
  c.model.memory.value_update, c.model.memory.value_sharding = "sparse", "column"
  c.train.batch_size, c.train.seq_len = 16, 64
  return config_from_dict(c).with_vocab(259)


@pytest.fixture(scope="module")
def compiled():
  out = {}
  for name, (n_keys, sizes, devices) in LAYOUTS.items():
    cfg = _cfg(n_keys, fused=name == "one_fused")
    exe, _ = compile_train_step(cfg.model, cfg.train, sizes, devices=jax.devices()[:devices] if devices else None,
                                update_chunk_rows=4096)
    out[name] = {"temp": exe.memory_analysis().temp_size_in_bytes, "hlo": exe.as_text(),
                 "gathers": [[(t, tuple(d)) for t, d in g.shapes] for g in comms.collectives(exe)
                             if g.kind == "all-gather"]}
  return out


def test_one_device_step_holds_global_full_width_row_gradients(compiled):
  # The reference point: without a mesh the row gradients span every lookup at full width.
  assert f"f32[{LOOKUPS},{DV}]" in compiled["one"]["hlo"]
  # The fused CPU update keeps one such buffer (the row sums), not XLA's several (kernel, clip, rows).
  assert "memjax_value_adam" in compiled["one_fused"]["hlo"] and "memjax_value_adam" not in compiled["one"]["hlo"]
  assert compiled["one_fused"]["temp"] < 0.5 * compiled["one"]["temp"], (compiled["one_fused"]["temp"],
                                                                          compiled["one"]["temp"])


@pytest.mark.parametrize("mesh", ["data8", "col_d2m4", "data8_small_table"])
def test_sharded_steps_gather_only_row_ids(compiled, mesh):
  # The merge over ``data`` all-gathers the int32 row ids of the lookups, never gradients.
  assert compiled[mesh]["gathers"] == [[("s32", (LOOKUPS,))]], compiled[mesh]["gathers"]


def test_column_sharded_step_has_no_full_width_buffer_over_the_global_lookups(compiled):
  # The global-batch kernel would create this; here every [lookups, .] buffer has Dv / memory columns.
  assert not re.search(rf"f32\[{LOOKUPS},{DV}\]", compiled["col_d2m4"]["hlo"])


def test_sharded_step_temporaries_shrink(compiled):
  one = compiled["one"]["temp"]  # ~5.4 [lookups, Dv] fp32 buffers (kernel, clip, Adam's rows)
  # data=8: the kernel sees 1/8 of the lookups; the merged gradient (and the psum's result) span the
  # rows the global batch can read, Adam's temporaries one chunk: ~2 buffers, measured 0.37x.
  assert compiled["data8"]["temp"] < 0.5 * one, (compiled["data8"]["temp"], one)
  # memory=4 columns on top: every such buffer has Dv/4 columns, measured 0.16x.
  assert compiled["col_d2m4"]["temp"] < 0.25 * one, (compiled["col_d2m4"]["temp"], one)
  # A table of 1024 rows: at most 1025 distinct rows whatever the batch, measured 0.05x.
  assert compiled["data8_small_table"]["temp"] < 0.1 * one, (compiled["data8_small_table"]["temp"], one)
