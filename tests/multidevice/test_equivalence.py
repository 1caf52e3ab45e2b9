"""Sharded training equals the 1-device run: meshes (data=8), (data=2, memory=4) column- and
row-sharded values, (data=4, fsdp=2), for both value updates (sparse, dense), on 8 fake CPU devices.

Tolerance: fp32, rtol 1e-4 / atol 1e-5 on losses, atol 2e-5 + rtol 1e-4 on parameters after 3
steps. Sharding changes the order of reductions (per-shard partial sums, then an all-reduce), so
results differ in the last bits (~1e-7 relative per reduction); Adam divides by sqrt(v), which
amplifies a relative gradient difference into at most the same relative update difference, times
lr (3e-3 here), so parameter differences stay ~1e-6 and losses ~1e-6 relative. A real bug (a missing
psum, a shard read twice, a gradient summed over the wrong axis) moves them by > 1e-2.
"""

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_raw, train_on_mesh
from memjax.config_bridge import config_from_dict

STEPS = 3
MESHES = {"data8": ("column", dict(data=8, fsdp=1, memory=1)),
          "col_d2m4": ("column", dict(data=2, fsdp=1, memory=4)),
          "row_d2m4": ("row", dict(data=2, fsdp=1, memory=4)),
          "fsdp_d4f2": ("column", dict(data=4, fsdp=2, memory=1))}
BATCHES = [random_batch(seed, 8, 32, 259) for seed in range(STEPS)]


def _cfg(update, value_sharding):
  c = tiny_raw()
  c.model.memory.value_update = update
  c.model.memory.value_sharding = value_sharding
  c.train.seq_len = 32
  return config_from_dict(c).with_vocab(259)


def _flat(state):
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_leaves_with_path({"params": state["params"], "values": state["values"]})}


def _train(cfg, sizes):
  """Losses, parameters and the first value-table shard's shape after ``STEPS`` steps."""
  losses, state = train_on_mesh(cfg, sizes, BATCHES)
  table = jax.tree.leaves(state["values"])[0]
  return losses, _flat(state), tuple(table.addressable_shards[0].data.shape), table.shape


@pytest.fixture(scope="module", params=["sparse", "dense"])
def runs(request):
  update = request.param
  ref = _train(_cfg(update, "column"), None)
  return update, ref, {name: _train(_cfg(update, vs), sizes) for name, (vs, sizes) in MESHES.items()}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_run_matches_one_device(runs, mesh):
  _, (ref_losses, ref_params, _, _), got = runs
  losses, params, _, _ = got[mesh]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
  for name, want in ref_params.items():
    np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=2e-5, err_msg=name)


def test_value_table_shards_are_what_the_mode_promises(runs):
  _, (_, _, _, (slots, dv)), got = runs
  assert got["data8"][2] == (slots, dv)  # replicated over data
  assert got["col_d2m4"][2] == (slots, dv // 4)  # column: Dv / memory
  assert got["row_d2m4"][2] == (slots // 4, dv)  # row: slots / memory
  assert got["fsdp_d4f2"][2] == (slots, dv)


def test_constrain_batch_splits_activations_over_data_and_fsdp():
  # memjax.sharding.constrain_batch pins the model's activations to the batch split (FSDP gathers the
  # weights instead of splitting a matmul's contracting axis); elsewhere it leaves them alone.
  from jax.sharding import NamedSharding, PartitionSpec as P
  from memjax import sharding
  double = jax.jit(lambda x: sharding.constrain_batch(x * 2.0))
  x = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8, 3, 5)
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, memory=1))
  with jax.set_mesh(mesh):
    y = double(jax.device_put(x, NamedSharding(mesh, P())))  # replicated in
    odd = double(jax.device_put(x[:6], NamedSharding(mesh, P())))  # 6 rows: 8 shards do not divide them
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
  assert [s.data.shape for s in y.addressable_shards] == [(1, 3, 5)] * 8
  np.testing.assert_array_equal(np.asarray(y), 2 * x)
  assert odd.sharding.is_fully_replicated
  memory_only = sharding.make_mesh(dict(data=1, fsdp=1, memory=8))  # nothing splits the batch
  with jax.set_mesh(memory_only):
    z = double(jax.device_put(x, NamedSharding(memory_only, P())))
  assert z.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(double(x)), 2 * x)  # no mesh
