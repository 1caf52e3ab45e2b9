"""A run's parameters-only export restores onto other meshes (``load_exported(path, mesh)``):
8 devices with data=8, column-sharded values (data=2, memory=4), FSDP (data=4, fsdp=2); the values
are bit-identical and the logits equal the 1-device model's."""

import numpy as np
import pytest

from helpers import tiny_config
from memjax import sharding
from memjax.train.checkpoint import load_exported
from memjax.train.loop import run

MESHES = {"data8": dict(data=8, fsdp=1, memory=1), "column": dict(data=2, fsdp=1, memory=4),
          "fsdp": dict(data=4, fsdp=2, memory=1)}
TOKENS = np.arange(16, dtype=np.int32).reshape(2, 8)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  run(tiny_config(tmp / "data"), str(tmp / "w"), progress=False)  # on the 8 devices: data=-1 -> 8
  return str(tmp / "w" / "export")


@pytest.fixture(scope="module")
def one_device(export):
  import jax
  model, _ = load_exported(export, sharding.make_mesh(dict(data=1, fsdp=1, memory=1), jax.devices()[:1]))
  return np.asarray(model.blocks[1].ffn.values.values[...], np.float64), np.asarray(model(TOKENS)[0])


@pytest.mark.parametrize("name", sorted(MESHES))
def test_export_restores_onto_the_mesh(export, one_device, name):
  want_values, want_logits = one_device
  model, _ = load_exported(export, sharding.make_mesh(MESHES[name]))
  values = model.blocks[1].ffn.values.values[...]
  np.testing.assert_array_equal(np.asarray(values, np.float64), want_values)
  np.testing.assert_allclose(np.asarray(model(TOKENS)[0]), want_logits, rtol=1e-4, atol=1e-4)
  if name == "data8":
    assert len(values.sharding.device_set) == 8
  if name == "column":
    assert values.sharding.shard_shape(values.shape) == (256, 8)  # value_dim 32 split over memory=4
