"""The CPU product-key top-k kernel inside ``jax.shard_map`` (2 of the 8 fake devices), with and
without ``check_vma``: equal to the XLA selection; ``product_key_topk`` under shard_map too."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax import product_key_topk
from memjax.kernels import cpu, topk

needs_kernel = pytest.mark.skipif(not cpu.ffi_status()[0], reason="the C++ CPU kernels did not build")


@needs_kernel
@pytest.mark.parametrize("check_vma", [False, True])
def test_kernel_under_shard_map_equals_xla(check_vma):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  s1, s2 = (rng.standard_normal((8, 2, 64)).astype(np.float32) for _ in range(2))
  want = topk.product_topk_xla(s1, s2, 5)
  f = jax.jit(jax.shard_map(lambda a, b: topk.product_topk_from_scores(a, b, 5), mesh=mesh,
                            in_specs=(P("data"), P("data")), out_specs=P("data"), check_vma=check_vma))
  for got, w in zip(f(s1, s2), want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
  assert "memjax_product_topk" in f.lower(s1, s2).as_text()


@needs_kernel
def test_product_key_topk_under_shard_map():
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  q = rng.standard_normal((8, 2, 16)).astype(np.float32)
  keys = rng.standard_normal((2, 2, 32, 8)).astype(np.float32)
  g = jax.jit(jax.shard_map(lambda q, kk: product_key_topk(q, kk, 4), mesh=mesh, in_specs=(P("data"), P()),
                            out_specs=P("data"), check_vma=False))
  np.testing.assert_array_equal(g(q, keys)[1], product_key_topk(q, keys, 4, backend="xla")[1])
