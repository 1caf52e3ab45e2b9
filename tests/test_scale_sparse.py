"""The row-sparse value update on a mesh runs per shard (``train_lib.sharded_sparse_value_update``):
each device computes row gradients for its own batch shard and its own columns of the table, the
shards are merged over the batch axes into a buffer bounded by the rows the batch can read, and Adam
runs over it in chunks. Checked on XLA's compiled step: its HLO and ``memory_analysis()`` (no timing). Equality with the 1-device run is in
``tests/test_scale_equivalence.py``."""

import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_devices import run_result_script

from memjax import train_lib
from memjax.optim import SparseAdamState, sparse_adam_update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lookups dominate this model's temporaries: 16 x 64 tokens x 4 heads x k=8 = 32768 lookups, each
# row gradient 128 floats (16 MiB per [lookups, Dv] fp32 buffer). With n_keys=256 the table has
# 65536 rows, more than the lookups: the merged gradient is bounded by the lookups; with n_keys=32
# (1024 rows) by the table. UPDATE_CHUNK_ROWS=4096 makes the sharded Adam loop run 8 chunks.
SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, REPO)
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from configs import tiny
    from memjax import comms, train_lib
    from memjax.run_config import config_from_dict
    train_lib.UPDATE_CHUNK_ROWS = 4096
    def cfg(n_keys):
      c = tiny.get_config()
      c.model.memory.n_keys, c.model.memory.heads, c.model.memory.k, c.model.memory.value_dim = n_keys, 4, 8, 128
      c.model.memory.value_update, c.model.memory.value_sharding = "sparse", "column"
      c.train.batch_size, c.train.seq_len = 16, 64
      return config_from_dict(c).with_vocab(259)
    out = {}
    for name, n_keys, sizes, devices in [("one", 256, dict(data=1, fsdp=1, memory=1), jax.devices()[:1]),
                                         ("data8", 256, dict(data=8, fsdp=1, memory=1), None),
                                         ("col_d2m4", 256, dict(data=2, fsdp=1, memory=4), None),
                                         ("data8_small_table", 32, dict(data=8, fsdp=1, memory=1), None)]:
      c = cfg(n_keys)
      compiled, *_ = comms.compile_train_step(c.model, c.train, sizes, devices=devices)
      out[name] = {"temp": compiled.memory_analysis().temp_size_in_bytes, "hlo": compiled.as_text(),
                   "gathers": [[[t, list(d)] for t, d in g.shapes] for g in comms.collectives(compiled)
                               if g.kind == "all-gather"]}
    print("RESULT" + json.dumps(out))
""").replace("REPO", repr(REPO))

LOOKUPS, DV, MEMORY = 16 * 64 * 4 * 8, 128, 4


@pytest.fixture(scope="module")
def results():
  return run_result_script(SCRIPT)


def test_one_device_step_holds_global_full_width_row_gradients(results):
  # The reference point: without a mesh the row gradients span every lookup at full width.
  assert f"f32[{LOOKUPS},{DV}]" in results["one"]["hlo"]


def test_sharded_steps_gather_only_row_ids(results):
  # The merge over ``data`` all-gathers the int32 row ids of the lookups, never gradients.
  for mesh in ("data8", "col_d2m4", "data8_small_table"):
    assert results[mesh]["gathers"] == [[["s32", [LOOKUPS]]]], (mesh, results[mesh]["gathers"])


def test_column_sharded_step_has_no_full_width_buffer_over_the_global_lookups(results):
  # The global-batch kernel would create this; here every [lookups, .] buffer has Dv / memory columns.
  assert not re.search(rf"f32\[{LOOKUPS},{DV}\]", results["col_d2m4"]["hlo"])


def test_sharded_step_temporaries_shrink(results):
  one = results["one"]["temp"]  # ~5.4 [lookups, Dv] fp32 buffers (kernel, clip, Adam's rows)
  # data=8: the kernel sees 1/8 of the lookups; the merged gradient (and the psum's result) span the
  # rows the global batch can read, Adam's temporaries one chunk: ~2 buffers, measured 0.37x.
  assert results["data8"]["temp"] < 0.5 * one, (results["data8"]["temp"], one)
  # memory=4 columns on top: every such buffer has Dv/4 columns, measured 0.16x.
  assert results["col_d2m4"]["temp"] < 0.25 * one, (results["col_d2m4"]["temp"], one)
  # A table of 1024 rows: at most 1025 distinct rows whatever the batch, measured 0.05x.
  assert results["data8_small_table"]["temp"] < 0.1 * one, (results["data8_small_table"]["temp"], one)


def test_distinct_rows_numbers_the_rows_in_order():
  rows = jnp.array([7, 3, 9, 3, 9, 9, 0], jnp.int32)  # 9 = num_slots: padding
  segment, distinct = train_lib.distinct_rows(rows, 9, multiple=3)
  assert distinct.tolist() == [0, 3, 7, 9] + [9] * 5  # size min(7, 10) = 7, rounded up to 9
  np.testing.assert_array_equal(distinct[segment], rows)


def test_chunked_sparse_adam_equals_one_update():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
  state = SparseAdamState(jnp.asarray(rng.normal(size=(40, 6)) ** 2, jnp.float32) * 0.1,
                          jnp.asarray(rng.normal(size=(40, 6)) ** 2, jnp.float32), jnp.array(3, jnp.int32))
  rows = jnp.asarray(np.concatenate([rng.permutation(40)[:21], [40, 40, 40]]), jnp.int32)  # 24 = 4 x 6
  grads = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
  adam = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  want_t, want_s = sparse_adam_update(table, state, rows, 0.5 * grads, 1e-2, **adam)
  got_t, got_s = jax.jit(lambda t, s: train_lib.chunked_sparse_adam_update(
      t, s, rows, grads, 1e-2, 0.5, chunk_rows=6, **adam))(table, state)
  for got, want in ((got_t, want_t), (got_s.mu, want_s.mu), (got_s.nu, want_s.nu)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert int(got_s.count) == int(want_s.count) == 4
