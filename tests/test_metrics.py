"""memory_usage against its definitions (memory-layers.md §6) on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import memory_usage, slot_mass


def _definitions(z):
  """numpy restatement of the docstring's definitions for a normalised mass vector z."""
  m = z.size
  nz = z[z > 0]
  lorenz = np.cumsum(np.sort(z))
  desc = np.cumsum(np.sort(z)[::-1])
  fewest = lambda p: int(np.argmax(desc >= p - 1e-9)) + 1
  return {
      "used": np.mean(z > 0), "kl": np.log(m) + np.sum(nz * np.log(nz)),
      "gini": 1 - 2 * np.mean(lorenz) + 1 / m,
      "top50": fewest(0.5), "top90": fewest(0.9), "top99": fewest(0.99)}


def test_even_use_has_zero_kl_and_gini():
  m = 8
  u = memory_usage(jnp.arange(m).reshape(2, 4), jnp.ones((2, 4)), m)
  assert float(u["used"]) == 1.0
  assert abs(float(u["kl"])) < 1e-6
  assert abs(float(u["gini"])) < 1e-6
  assert int(u["top50"]) == 4 and int(u["top90"]) == 8 and int(u["top99"]) == 8


def test_one_slot_has_kl_log_m():
  m = 16
  u = memory_usage(jnp.full((3, 5), 7), jnp.full((3, 5), 0.2), m)
  assert float(u["used"]) == pytest.approx(1 / m)
  assert float(u["kl"]) == pytest.approx(np.log(m), rel=1e-6)
  assert float(u["gini"]) == pytest.approx(1 - 1 / m, rel=1e-6)
  assert int(u["top50"]) == int(u["top90"]) == int(u["top99"]) == 1


def test_hand_computed_skewed_case():
  # Mass 0.6 on slot 0, 0.3 on slot 1, 0.1 on slot 2, nothing on slot 3.
  idx = jnp.array([[0, 1, 2], [0, 0, 1]])
  w = jnp.array([[0.2, 0.1, 0.1], [0.2, 0.2, 0.2]])
  u = memory_usage(idx, w, 4)
  assert float(u["used"]) == 0.75
  kl = np.log(4) + 0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1)
  assert float(u["kl"]) == pytest.approx(kl, rel=1e-5)
  # Lorenz points of ascending z = [0, .1, .3, .6]: cumsum [0, .1, .4, 1], mean .375 -> 1 - .75 + .25
  assert float(u["gini"]) == pytest.approx(0.5, abs=1e-6)
  assert (int(u["top50"]), int(u["top90"]), int(u["top99"])) == (1, 2, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_definitions_under_jit(seed):
  rng = np.random.default_rng(seed)
  m = 50
  idx = rng.integers(0, m, size=(20, 6))
  w = rng.random((20, 6)).astype(np.float32)
  got = jax.jit(memory_usage, static_argnums=2)(idx, w, m)
  z = np.asarray(slot_mass(jnp.asarray(idx), jnp.asarray(w), m), np.float64)
  np.testing.assert_allclose(z.sum(), 1.0, rtol=1e-6)
  want = _definitions(z)
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_bad_arguments():
  with pytest.raises(ValueError, match="weights.shape"):
    memory_usage(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2)), 4)
  with pytest.raises(ValueError, match="num_slots"):
    memory_usage(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)), 0)


def test_bits_stored_is_the_formula_and_the_synthetic_base_holds_about_8k_bits():
  import math

  from memjax.data.knowledge import ATTRIBUTES, attribute_bit_budget, make_entities, qa_pairs
  from memjax.metrics import bits_stored

  out = bits_stored({"a": 0.25, "b": 1.0}, {"a": 8, "b": 3}, {"a": 16, "b": 1})
  assert out["by_attribute"] == {"a": 0.25 * 8 * 4.0, "b": 0.0} and out["bits"] == 8.0
  facts, values = attribute_bit_budget(qa_pairs(make_entities(200, seed=0)))
  assert facts == {a.name: 200 for a in ATTRIBUTES}
  assert values == {a.name: len(a.values) for a in ATTRIBUTES}
  full = bits_stored({a: 1.0 for a in facts}, facts, values)["bits"]
  assert full == pytest.approx(200 * sum(math.log2(len(a.values)) for a in ATTRIBUTES))
  assert 7_900 < full < 8_000  # the "about 8k bits" for 200 people x 6 attributes


@pytest.mark.parametrize("args,match", [
    (({"a": 1.5}, {"a": 1}, {"a": 2}), r"exact_match_by_attribute\['a'\]=1.5 must be in \[0, 1\]"),
    (({"a": 0.5}, {}, {"a": 2}), "attribute 'a' needs"),
    (({"a": 0.5}, {"a": 1}, {"a": 0}), r"values_by_attribute\['a'\]=0 must be >= 1"),
])
def test_bits_stored_refuses_bad_input(args, match):
  from memjax.metrics import bits_stored
  with pytest.raises(ValueError, match=match):
    bits_stored(*args)
