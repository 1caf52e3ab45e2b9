"""product_key_topk against brute force over all n^2 slots."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import product_key_topk


def _brute_force(query, keys, k):
  """numpy: every slot's score, then the top k (descending)."""
  q, kk = np.asarray(query, np.float64), np.asarray(keys, np.float64)
  half = kk.shape[-1]
  s1 = np.einsum("...hd,hnd->...hn", q[..., :half], kk[:, 0])
  s2 = np.einsum("...hd,hnd->...hn", q[..., half:], kk[:, 1])
  n = kk.shape[2]
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  order = np.argsort(-full, axis=-1)[..., :k]
  return np.take_along_axis(full, order, -1), order, full


@pytest.mark.parametrize("heads,n,dk,k", [(1, 8, 4, 3), (2, 16, 8, 16), (4, 32, 16, 5), (3, 7, 6, 7), (2, 64, 32, 32)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(heads, n, dk, k, seed):
  rng = np.random.default_rng(seed * 1000 + n)
  query = rng.standard_normal((3, 5, heads, dk)).astype(np.float32)
  keys = rng.standard_normal((heads, 2, n, dk // 2)).astype(np.float32)
  scores, idx = jax.jit(product_key_topk, static_argnums=2)(query, keys, k)
  assert scores.shape == idx.shape == (3, 5, heads, k)
  assert idx.dtype == jnp.int32
  want_scores, want_idx, full = _brute_force(query, keys, k)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  # Continuous random inputs have no ties: the slot sets agree exactly.
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(want_idx, -1))
  # Each returned score is the score of its returned slot, and scores are sorted descending.
  np.testing.assert_allclose(scores, np.take_along_axis(full, np.asarray(idx), -1), rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=-1) <= 0)


class IndexLayoutTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_layout_is_i_times_n_plus_j(self):
    # One sub-key per half wins by a margin: slot index must be i * n + j.
    n, i, j = 10, 3, 7
    keys = np.zeros((1, 2, n, 2), np.float32)
    keys[0, 0, i] = [5.0, 0.0]
    keys[0, 1, j] = [0.0, 5.0]
    query = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)[:, None, :]  # [1, H=1, Dk=4]
    _, idx = self.variant(lambda q, kk: product_key_topk(q, kk, 1))(query, keys)
    chex.assert_shape(idx, (1, 1, 1))
    assert int(idx[0, 0, 0]) == i * n + j


def test_scores_are_differentiable():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((4, 2, 8)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((2, 2, 6, 4)), jnp.float32)
  g = jax.grad(lambda q: product_key_topk(q, keys, 3)[0].sum())(q)
  assert g.shape == q.shape and np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("query_shape,keys_shape,k,field", [
    ((2, 8), (2, 2, 4, 4), 5, "k=5"),            # k > n
    ((2, 7), (2, 2, 4, 4), 2, "Dk=7"),            # odd Dk
    ((3, 8), (2, 2, 4, 4), 2, "heads"),           # H mismatch
    ((2, 8), (2, 2, 4, 3), 2, "Dk=8"),            # half-width mismatch
    ((2, 8), (2, 3, 4, 4), 2, "keys"),            # not two halves
    ((2, 8), (2, 2, 4, 4), 0, "k=0"),
])
def test_bad_arguments_name_the_argument(query_shape, keys_shape, k, field):
  with pytest.raises(ValueError, match=field):
    product_key_topk(jnp.zeros(query_shape), jnp.zeros(keys_shape), k)


def test_gradients_equal_those_of_the_brute_force_top_k():
  # The gradient is taken through a recomputation from the k chosen sub-keys; it must equal
  # autodiff through the brute-force top-k over all n^2 slots.
  from memjax import product_key_topk_reference
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.standard_normal((6, 3, 8)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((3, 2, 10, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, 3, 4)), jnp.float32)
  def loss(fn):
    return lambda q, kk: jnp.sum(w * jnp.sort(fn(q, kk, 4)[0], axis=-1))
  got = jax.grad(loss(product_key_topk), argnums=(0, 1))(q, keys)
  want = jax.grad(loss(product_key_topk_reference), argnums=(0, 1))(q, keys)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[1]).sum()) > 0
