"""The NNX memory layer: shapes, causality per token, the shared pool, full-size eval_shape, flags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import (MemoryConfig, ProductKeyMemory, ValueTable, memory_read, product_key_topk_reference,
                    shared_memory_layers)
from memjax.sharding import LOGICAL_AXES

SMALL = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=8, value_dim=24)


class Stack(nnx.Module):
  """Several memory layers over one pool, applied in sequence with residuals."""

  def __init__(self, dim, config, num_layers, rngs):
    self.pool, layers = shared_memory_layers(dim, config, num_layers, rngs=rngs)
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for layer in self.layers:
      x = x + layer(x)
    return x


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_output_shapes():
  layer = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(0))
  r = layer.read(_x((3, 5, 24)))
  assert r.out.shape == (3, 5, 24)
  assert r.indices.shape == r.weights.shape == (3, 5, 2, 4)
  assert r.indices.dtype == jnp.int32
  np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
  assert int(r.indices.min()) >= 0 and int(r.indices.max()) < SMALL.num_slots


def test_lookup_is_the_exact_top_k_of_its_queries():
  layer = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(1))
  x = _x((7, 24), 1)
  q, keys = layer.queries(x)
  _, want = product_key_topk_reference(q, keys, SMALL.k)
  got = layer.read(x).indices
  np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


def test_tokens_are_independent():
  layer = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(2))
  x = _x((5, 24), 2)
  jac = jax.jacrev(layer)(x)  # [T, C, T, C]
  norms = jnp.abs(jac).sum(axis=(1, 3))  # [T, T]
  off_diagonal = norms * (1 - jnp.eye(5))
  assert float(off_diagonal.max()) == 0.0
  assert float(jnp.diag(norms).min()) > 0.0


def _pool_grad(grads):
  leaves = [v for path, v in nnx.to_flat_state(grads) if path[-1] == "values"]
  assert len(leaves) == 1, "the pool's gradient must be one array"
  return leaves[0][...]


def test_shared_pool_is_one_array_and_sums_every_layers_gradient():
  model = Stack(24, SMALL, 3, nnx.Rngs(3))
  values_leaves = [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "values" in path]
  assert len(values_leaves) == 1, "the pool must be stored once"
  assert all(layer.values is model.pool for layer in model.layers)

  x = _x((6, 24), 3)
  # Gradient of a loss that reads every layer once, on the same input, against the pool.
  def loss_all(m):
    return sum(jnp.sum(layer(x) ** 2) for layer in m.layers)
  g_all = _pool_grad(nnx.grad(loss_all)(model))

  def loss_one(i):
    return lambda m: jnp.sum(m.layers[i](x) ** 2)
  g_each = [_pool_grad(nnx.grad(loss_one(i))(model)) for i in range(3)]
  for g in g_each:
    assert float(jnp.abs(g).sum()) > 0  # every layer contributes
  np.testing.assert_allclose(g_all, sum(g_each), rtol=1e-5, atol=1e-6)


def test_paper_size_eval_shape_allocates_nothing_and_matches_formula():
  cfg = MemoryConfig(n_keys=1024, heads=4, k=32, key_dim=512, value_dim=1024)
  abstract = nnx.eval_shape(lambda: Stack(1024, cfg, 3, nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == cfg.param_count(1024, layers=3, shared=True)
  # The abstract forward pass traces at full size without allocating either.
  out = jax.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((2, 8, 1024), jnp.float32))
  assert out.shape == (2, 8, 1024)


@pytest.mark.parametrize("flags", [dict(), dict(qk_norm=True), dict(swilu=False, gated=True),
                                   dict(value_dim=40, swilu=False)])
def test_param_count_matches_formula(flags):
  cfg = MemoryConfig(**{**SMALL.__dict__, **flags})
  layer = ProductKeyMemory(24, cfg, rngs=nnx.Rngs(0))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert count == cfg.param_count(24)


def test_every_param_names_its_logical_axes():
  cfg = MemoryConfig(**{**SMALL.__dict__, "qk_norm": True, "gated": True})
  layer = ProductKeyMemory(24, cfg, rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, path
    assert all(a in LOGICAL_AXES for a in axes), (path, axes)
  assert layer.values.values.get_metadata()["logical_axes"] == ("slots", "value_dim")


def test_swilu_changes_only_the_output_transform():
  on = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(4))
  off = ProductKeyMemory(24, MemoryConfig(**{**SMALL.__dict__, "swilu": False}), rngs=nnx.Rngs(4))
  for name in ("query", "query_bias", "keys"):
    np.testing.assert_array_equal(getattr(on, name)[...], getattr(off, name)[...])
  np.testing.assert_array_equal(on.values.values[...], off.values.values[...])
  x = _x((5, 24), 4)
  r_on, r_off = on.read(x), off.read(x)
  np.testing.assert_array_equal(r_on.indices, r_off.indices)
  np.testing.assert_array_equal(r_on.weights, r_off.weights)
  # Off (Dv == C): the output is the read y itself. On: W2 (y * silu(W1 x)).
  q, keys = on.queries(x)
  y = memory_read(q, keys, on.values.values[...], k=SMALL.k).out
  np.testing.assert_allclose(r_off.out, y, rtol=1e-6)
  want_on = (y * jax.nn.silu(x @ on.w1[...])) @ on.w2[...]
  np.testing.assert_allclose(r_on.out, want_on, rtol=1e-5, atol=1e-6)
  assert not hasattr(off, "w1") and not hasattr(off, "w2")


def test_qk_norm_makes_scores_scale_free_and_touches_nothing_else():
  cfg_n = MemoryConfig(**{**SMALL.__dict__, "qk_norm": True})
  plain, normed = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(5)), ProductKeyMemory(24, cfg_n, rngs=nnx.Rngs(5))
  for name in ("query", "query_bias", "keys", "w1", "w2"):
    np.testing.assert_array_equal(getattr(plain, name)[...], getattr(normed, name)[...])
  x = _x((6, 24), 5)
  before_n, before_p = normed.read(x), plain.read(x)
  # Scale all sub-keys by 7: with qk-norm nothing changes; without it the softmax sharpens.
  normed.keys[...] = normed.keys[...] * 7.0
  plain.keys[...] = plain.keys[...] * 7.0
  after_n, after_p = normed.read(x), plain.read(x)
  np.testing.assert_array_equal(after_n.indices, before_n.indices)
  np.testing.assert_allclose(after_n.weights, before_n.weights, rtol=2e-4)  # eps in the RMS
  np.testing.assert_array_equal(after_p.indices, before_p.indices)  # a positive scale keeps the order
  assert float(jnp.abs(after_p.weights - before_p.weights).max()) > 1e-3


def test_gate_scales_each_token_by_a_sigmoid():
  cfg = MemoryConfig(**{**SMALL.__dict__, "gated": True})
  gated = ProductKeyMemory(24, cfg, rngs=nnx.Rngs(6))
  plain = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(6))
  x = _x((4, 24), 6)
  g = jax.nn.sigmoid(x @ gated.gate_w[...] + gated.gate_b[...])
  np.testing.assert_allclose(gated(x), plain(x) * g[:, None], rtol=1e-5, atol=1e-6)


def test_bad_shared_pool_and_input():
  pool = ValueTable(MemoryConfig(n_keys=8, heads=2, k=4, key_dim=8, value_dim=24), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="slots"):
    ProductKeyMemory(24, SMALL, values=pool, rngs=nnx.Rngs(0))
  layer = ProductKeyMemory(24, SMALL, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dim=24"):
    layer(jnp.ones((2, 23)))
