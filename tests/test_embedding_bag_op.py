"""embedding_bag against a numpy reference: forward, both gradients, transformations, dtypes."""

import chex
import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from memjax import embedding_bag, embedding_bag_reference


def _np_forward(values, idx, w):
  v = np.asarray(values, np.float64)
  return np.einsum("...l,...ld->...d", np.asarray(w, np.float64), v[np.asarray(idx)])


def _np_grads(values, idx, w, dout):
  """d_values by an explicit loop over every (bag, position) pair; d_weights by row dots."""
  v = np.asarray(values, np.float64)
  idx2 = np.asarray(idx).reshape(-1, idx.shape[-1])
  w2 = np.asarray(w, np.float64).reshape(idx2.shape)
  d2 = np.asarray(dout, np.float64).reshape(idx2.shape[0], -1)
  dv = np.zeros_like(v)
  dw = np.zeros_like(w2)
  for b in range(idx2.shape[0]):
    for l in range(idx2.shape[1]):
      dv[idx2[b, l]] += w2[b, l] * d2[b]
      dw[b, l] = d2[b] @ v[idx2[b, l]]
  return dv, dw.reshape(w.shape)


def _inputs(seed, m=13, d=6, lead=(4, 3), bag=5):
  rng = np.random.default_rng(seed)
  values = rng.standard_normal((m, d)).astype(np.float32)
  idx = rng.integers(0, m, size=(*lead, bag)).astype(np.int32)
  idx[..., 1] = idx[..., 0]  # duplicates inside a bag ...
  idx[(0,) * len(lead)] = 2   # ... and a bag that reads one row only
  w = rng.standard_normal((*lead, bag)).astype(np.float32)
  dout = rng.standard_normal((*lead, d)).astype(np.float32)
  return values, idx, w, dout


class JitAndEagerTest(chex.TestCase):
  """The op under ``jax.jit`` and eagerly (``chex.variants``) against numpy."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_forward_and_gradients_match_numpy(self, seed):
    values, idx, w, dout = _inputs(seed)
    f = self.variant(lambda v, i, ww: embedding_bag(v, i, ww, backend="xla"))
    out, vjp = jax.vjp(lambda v, ww: f(v, idx, ww), values, w)
    chex.assert_shape(out, (*idx.shape[:-1], values.shape[1]))
    np.testing.assert_allclose(out, _np_forward(values, idx, w), rtol=1e-5, atol=1e-5)
    dv, dw = vjp(dout)
    want_dv, want_dw = _np_grads(values, idx, w, dout)
    np.testing.assert_allclose(dv, want_dv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_check_grads():
  values, idx, w, _ = _inputs(3, m=7, d=3, lead=(3,), bag=4)
  values, w = jnp.asarray(values, jnp.float32), jnp.asarray(w, jnp.float32)
  check_grads(lambda v, ww: embedding_bag(v, idx, ww), (values, w), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


def test_jit_vmap_and_eager_agree():
  values, idx, w, _ = _inputs(4)
  eager = embedding_bag(values, idx, w)
  jitted = jax.jit(embedding_bag)(values, idx, w)
  vmapped = jax.vmap(embedding_bag, in_axes=(None, 0, 0))(values, idx, w)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vmapped, eager, rtol=1e-6, atol=1e-6)
  g_eager = jax.grad(lambda v: embedding_bag(v, idx, w).sum())(values)
  g_vmap = jax.grad(lambda v: jax.vmap(embedding_bag, in_axes=(None, 0, 0))(v, idx, w).sum())(values)
  np.testing.assert_allclose(g_vmap, g_eager, rtol=1e-5, atol=1e-5)


def test_matches_reference_function():
  values, idx, w, dout = _inputs(5)
  got, vjp_got = jax.vjp(lambda v, ww: embedding_bag(v, idx, ww), values, w)
  want, vjp_want = jax.vjp(lambda v, ww: embedding_bag_reference(v, idx, ww), values, w)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for a, b in zip(vjp_got(dout), vjp_want(dout)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_values_accumulate_in_fp32():
  # 1024 rows of 1.0: fp32 accumulation gives 1024 exactly (representable in bf16); a bf16 running
  # sum stalls at 256, where adding 1 rounds back to 256.
  bag = 1024
  values = jnp.ones((4, 8), jnp.bfloat16)
  idx = jnp.zeros((1, bag), jnp.int32)
  w = jnp.ones((1, bag), jnp.bfloat16)
  out = embedding_bag(values, idx, w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), 1024.0)
  acc = ml_dtypes.bfloat16(0)
  for _ in range(bag):  # what bf16 accumulation would give
    acc = ml_dtypes.bfloat16(acc + ml_dtypes.bfloat16(1))
  assert float(acc) == 256.0
  out32 = embedding_bag(values, idx, w.astype(jnp.float32))  # fp32 weights promote the output
  assert out32.dtype == jnp.float32
  np.testing.assert_array_equal(out32, 1024.0)


def test_bf16_gradients_have_value_dtype():
  values, idx, w, _ = _inputs(6)
  dv = jax.grad(lambda v: embedding_bag(v, idx, w).astype(jnp.float32).sum())(jnp.asarray(values, jnp.bfloat16))
  assert dv.dtype == jnp.bfloat16
  want = _np_grads(values.astype(np.float32), idx, w, np.ones((*idx.shape[:-1], values.shape[1])))[0]
  np.testing.assert_allclose(np.asarray(dv, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("args,match", [
    (dict(values=np.zeros((3,)), indices=np.zeros((2, 2), np.int32), weights=np.zeros((2, 2))), "values"),
    (dict(values=np.zeros((3, 2)), indices=np.zeros((2, 2)), weights=np.zeros((2, 2))), "indices"),
    (dict(values=np.zeros((3, 2)), indices=np.zeros((2, 2), np.int32), weights=np.zeros((2, 3))), "weights"),
    (dict(values=np.zeros((3, 2), np.int32), indices=np.zeros((2, 2), np.int32), weights=np.zeros((2, 2))), "values"),
])
def test_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    embedding_bag(**args)


def test_unknown_backend_lists_allowed():
  with pytest.raises(ValueError, match=r"backend='nope'.*allowed.*xla"):
    embedding_bag(np.zeros((3, 2)), np.zeros((2, 2), np.int32), np.zeros((2, 2)), backend="nope")


@pytest.mark.parametrize("seed", [0, 1])
def test_row_grads_scatter_to_the_dense_gradient(seed):
  from memjax import embedding_bag_row_grads
  values, idx, w, dout = _inputs(seed)
  rows, grads = jax.jit(embedding_bag_row_grads, static_argnums=3)(idx, w, dout, values.shape[0])
  n = idx.size
  assert rows.shape == (n,) and grads.shape == (n, values.shape[1])
  distinct = np.unique(idx)
  np.testing.assert_array_equal(rows[: distinct.size], distinct)  # distinct rows, ascending
  assert np.all(np.asarray(rows[distinct.size:]) == values.shape[0])  # then padding
  np.testing.assert_array_equal(grads[distinct.size:], 0.0)
  dense = jnp.zeros(values.shape, jnp.float32).at[rows].add(grads, mode="drop")
  np.testing.assert_allclose(dense, _np_grads(values, idx, w, dout)[0], rtol=1e-5, atol=1e-5)
