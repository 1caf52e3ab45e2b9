"""A model with a PEER block trains the same on a mesh as on one device (8 fake CPU devices).

PEER's tables are laid out by their logical axes (``experts`` replicated, ``embed`` over ``fsdp``) and
its retrieval is partitioned by GSPMD, which replicates the operands of the kernels it cannot see into
(the CPU top-k, the embedding bag). Same tolerances as ``test_equivalence.py``.
"""

import jax
import numpy as np
import pytest

from helpers import random_batch, tiny_raw, train_on_mesh
from memjax.config_bridge import config_from_dict

STEPS = 3
MESHES = {"data8": dict(data=8, fsdp=1, memory=1), "fsdp_d4f2": dict(data=4, fsdp=2, memory=1),
          "col_d2m4": dict(data=2, fsdp=1, memory=4)}
BATCHES = [random_batch(seed, 8, 32, 259) for seed in range(STEPS)]


def _cfg():
  c = tiny_raw()
  c.model.num_layers = 3
  c.model.memory.layers = "2"
  c.model.peer.layers = "1"
  c.model.peer.num_experts = 16 * 16
  c.model.peer.heads = 2
  c.model.peer.top_k = 4
  c.model.peer.key_dim = 16
  c.train.seq_len = 32
  return config_from_dict(c).with_vocab(259)


def _train(cfg, sizes):
  losses, state = train_on_mesh(cfg, sizes, BATCHES)
  down = state["params"]["blocks"][1]["ffn"]["down"][...]
  flat = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
  return losses, flat, tuple(down.addressable_shards[0].data.shape)


@pytest.fixture(scope="module")
def reference():
  return _train(_cfg(), None)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_peer_model_on_a_mesh_matches_one_device(reference, mesh):
  ref_losses, ref_params, (experts, c) = reference
  losses, params, shard = _train(_cfg(), MESHES[mesh])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
  for name, want in ref_params.items():
    np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=2e-5, err_msg=name)
  assert shard == (experts, c // MESHES[mesh]["fsdp"])  # the expert tables split C over fsdp, like FSDP
