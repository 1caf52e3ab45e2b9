"""memjax.attention: every implementation is causal attention within documents, as the plain einsum is;
``model.attention`` is a checked config field. The fused kernels themselves (cuDNN, the TPU Pallas
flash kernel) are compiled for their targets by tests/test_compile.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.attention import ATTENTION_IMPLS, attention, attention_reference
from memjax.config import ConfigError, ModelConfig
from memjax.model import LM


def _qkv(seed=0, b=2, t=24, n=3, d=8):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32) for _ in range(3))
  # Packed documents of uneven lengths, a different cut in each row.
  seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [5, 12, 7]), np.repeat([1, 2], [17, 7])]), jnp.int32)
  return q, k, v, seg


def _brute_force(q, k, v, seg):
  """Loops over queries: softmax over the keys at or before i in i's document."""
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
      for n in range(q.shape[2]):
        s = np.array([q[b, i, n] @ k[b, j, n] for j in keys]) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max())
        out[b, i, n] = (w / w.sum()) @ v[b, keys, n]
  return out


def test_the_reference_is_causal_attention_within_documents():
  q, k, v, seg = _qkv()
  np.testing.assert_allclose(attention_reference(q, k, v, seg), _brute_force(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_jax_dot_product_attention_equals_the_reference_values_and_gradients():
  q, k, v, seg = _qkv(1)
  np.testing.assert_allclose(attention(q, k, v, seg, impl="xla"), attention_reference(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
  grad = lambda impl: jax.grad(lambda q, k, v: jnp.vdot(attention(q, k, v, seg, impl=impl), w), argnums=(0, 1, 2))
  for a, b in zip(grad("xla")(q, k, v), grad("einsum")(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_on_cpu_is_the_reference_bit_for_bit():
  q, k, v, seg = _qkv(3)
  np.testing.assert_array_equal(jax.jit(lambda *a: attention(*a, impl="auto"))(q, k, v, seg),
                                jax.jit(attention_reference)(q, k, v, seg))


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_the_lm_gives_the_same_logits_with_each_cpu_implementation(impl):
  cfg = ModelConfig(vocab_size=40, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 40, (2, 16)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1, 2]], [9, 7], axis=1).repeat(2, 0), jnp.int32)
  ref, _ = LM(dataclasses.replace(cfg, attention="einsum"), rngs=nnx.Rngs(0))(tokens, seg)
  out, _ = LM(dataclasses.replace(cfg, attention=impl), rngs=nnx.Rngs(0))(tokens, seg)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_an_unknown_implementation_is_refused_with_the_field_and_the_choices():
  with pytest.raises(ConfigError) as e:
    ModelConfig(attention="flash")
  assert "attention" in str(e.value) and all(i in str(e.value) for i in ATTENTION_IMPLS)
  with pytest.raises(ValueError, match="pallas_tpu"):
    attention(*_qkv(), impl="flash")
