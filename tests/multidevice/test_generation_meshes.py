"""Generation on 8 devices equals 1 device: value table column- or row-sharded over ``memory`` (the
training's shard_map reads) and the batch over ``data``, from a model laid out by ``load_exported``."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from memjax import sharding
from memjax.config import Config, LMMemoryConfig, MemoryConfig, ModelConfig
from memjax.config_bridge import config_to_dict
from memjax.generation import generate
from memjax.model import LM, split_model
from memjax.train.checkpoint import export_params, load_exported

MEM = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=16, value_dim=32, swilu=True)
LENGTHS = np.array([9, 4, 6, 9, 2, 7, 5, 8], np.int32)


def _config(mode: str) -> Config:
  model = ModelConfig(vocab_size=64, dim=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64,
                      memory=LMMemoryConfig(layer=MEM, layers=(0, 2), shared=True, value_sharding=mode,
                                            backend="xla"))
  return Config(model=model)


@pytest.fixture(scope="module")
def prompts():
  tokens = np.array(jax.random.randint(jax.random.key(3), (8, 9), 3, 64), np.int32)
  for b, n in enumerate(LENGTHS):
    tokens[b, n:] = 0
  return tokens


@pytest.fixture(scope="module")
def one_device(prompts):
  """The 1-device reference (one model for both modes: on one device the value sharding changes nothing)."""
  one = LM(_config("column").model, rngs=nnx.Rngs(0))
  return one, [generate(one, prompts, LENGTHS, max_new_tokens=6, **kw) for kw in SETTINGS]


SETTINGS = (dict(), dict(temperature=1.5, top_k=20, seed=4))


@pytest.mark.parametrize("mode", ["column", "row"])
def test_generation_on_a_mesh_equals_one_device(mode, prompts, one_device, tmp_path):
  cfg = _config(mode)
  one, refs = one_device
  _, params, values = split_model(one)
  export_params(str(tmp_path / "export"), params, values, config_to_dict(cfg))
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, memory=4))
  model, _ = load_exported(str(tmp_path / "export"), mesh)
  table = model.pool.values[...]
  want_shard = (256, 8) if mode == "column" else (64, 32)
  assert table.sharding.shard_shape(table.shape) == want_shard and len(table.sharding.device_set) == 8
  for kw, ref in zip(SETTINGS, refs):
    got = generate(model, prompts, LENGTHS, max_new_tokens=6, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens), err_msg=f"{mode} {kw}")
  # The read really ran under shard_map on the mesh: its jaxpr has the shard_map.
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st).decode(
        prompts[:, :1], np.zeros((8, 1), np.int32), nnx.merge(graphdef, st).init_cache(8, 2))[0])(state))
  assert "shard_map" in text and (("psum" in text) == (mode == "row"))
