"""Generation with a KV cache against the uncached forward pass (the oracle), prompts of several
lengths, sampling, eos and stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ConfigError, GenerateConfig, LMMemoryConfig, MemoryConfig, ModelConfig, MoEConfig
from memjax.data.errors import DataError
from memjax.data.tokenizers import ByteTokenizer
from memjax.generation import (cut_at_stop, decode_step, encode_prompts, generate, generate_stream,
                               generate_text, prefill, sample_token)
from memjax.model import LM

V = 48
MEM = MemoryConfig(n_keys=8, heads=2, k=4, key_dim=16, value_dim=32, swilu=False)
MEM_PLUS = MemoryConfig(n_keys=8, heads=2, k=4, key_dim=16, value_dim=32, swilu=True)
BASE = dict(vocab_size=V, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
KINDS = {
    "dense": ModelConfig(**BASE),
    "memory": ModelConfig(**BASE, memory=LMMemoryConfig(layer=MEM, layers=(1,), shared=False)),
    "memory_plus": ModelConfig(**BASE, memory=LMMemoryConfig(layer=MEM_PLUS, layers=(0, 1), shared=True)),
    # capacity E/K: the uncached forward drops no token either, so it is the oracle of dropless decoding
    "moe": ModelConfig(**BASE, moe=MoEConfig(layers=(1,), num_experts=4, top_k=2, capacity_factor=2.0)),
}
LENGTHS = np.array([7, 3, 5])
N = 6


@pytest.fixture(scope="module")
def prompts():
  tokens = np.random.default_rng(5).integers(1, V, (3, 7)).astype(np.int32)
  for b, n in enumerate(LENGTHS):
    tokens[b, n:] = 0  # pad right of each prompt
  return tokens


@pytest.fixture(scope="module", params=sorted(KINDS))
def model(request):
  return request.param, LM(KINDS[request.param], rngs=nnx.Rngs(0))


def _teacher_forced(model, prompts, new_tokens):
  """The uncached oracle: one forward over each row's prompt + its generated tokens (causal, so the
  logits at position p see tokens 0..p only): logits [B, N, V] predicting each new token."""
  b, t = prompts.shape
  full = np.zeros((b, t + N), np.int32)
  for r, n in enumerate(LENGTHS):
    full[r, :n] = prompts[r, :n]
    full[r, n:n + N] = new_tokens[r]
  logits = np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(full)))
  return np.stack([logits[r, n - 1:n - 1 + N] for r, n in enumerate(LENGTHS)])


def test_cached_greedy_equals_uncached_argmax_at_every_step(model, prompts):
  kind, lm = model
  out = generate(lm, prompts, LENGTHS, max_new_tokens=N)
  new = np.asarray(out.tokens)
  assert new.shape == (3, N) and np.asarray(out.lengths).tolist() == [N] * 3
  ref_logits = _teacher_forced(lm, prompts, new)
  np.testing.assert_array_equal(new, ref_logits.argmax(-1), err_msg=kind)

  # And the cached logits themselves, step by step, are the forward's within fp32 noise.
  graphdef, state = nnx.split(lm)

  @jax.jit
  def cached_logits(st, tokens, lengths, new_BxN):
    model = nnx.merge(graphdef, st)
    logits, cache = prefill(model, tokens, lengths, tokens.shape[1] + N - 1)

    def step(cache, i):
      out, cache = decode_step(model, new_BxN[:, i - 1], lengths + i - 1, cache)
      return cache, out
    _, rest = jax.lax.scan(step, cache, jnp.arange(1, N))
    return jnp.concatenate([logits[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

  got = cached_logits(state, jnp.asarray(prompts), jnp.asarray(LENGTHS), jnp.asarray(new))
  np.testing.assert_allclose(np.asarray(got), ref_logits, atol=2e-5, rtol=1e-5, err_msg=kind)


def test_each_row_generates_as_if_alone(prompts):
  lm = LM(KINDS["memory_plus"], rngs=nnx.Rngs(1))
  batch = np.asarray(generate(lm, prompts, LENGTHS, max_new_tokens=N).tokens)
  for b, n in enumerate(LENGTHS):
    alone = np.zeros((1, prompts.shape[1]), np.int32)  # a batch of one (one shape: one compilation)
    alone[0, :n] = prompts[b, :n]
    np.testing.assert_array_equal(batch[b], np.asarray(generate(lm, alone, [n], max_new_tokens=N).tokens)[0])
  # Changing the pad ids right of a short prompt changes nothing.
  noisy = prompts.copy()
  noisy[1, LENGTHS[1]:] = 17
  np.testing.assert_array_equal(np.asarray(generate(lm, noisy, LENGTHS, max_new_tokens=N).tokens), batch)


def test_eos_stops_a_row_and_is_not_emitted(prompts):
  lm = LM(KINDS["dense"], rngs=nnx.Rngs(0))
  free = np.asarray(generate(lm, prompts, LENGTHS, max_new_tokens=N).tokens)
  eos = int(free[0, 2])
  first = [int(np.flatnonzero(row == eos)[0]) if eos in row else N for row in free]
  out = generate(lm, prompts, LENGTHS, max_new_tokens=N, eos_id=eos, pad_id=-7)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  assert lengths.tolist() == first and np.asarray(out.stopped).tolist() == [f < N for f in first]
  for b, f in enumerate(first):
    np.testing.assert_array_equal(tokens[b, :f], free[b, :f])
    assert (tokens[b, f:] == -7).all()


def test_sampling_is_reproducible_and_seeded(prompts):
  lm = LM(KINDS["memory"], rngs=nnx.Rngs(0))
  run = lambda seed, **kw: np.asarray(generate(lm, prompts, LENGTHS, max_new_tokens=N, temperature=2.0,
                                               seed=seed, **kw).tokens)
  a, b, c = run(3), run(3), run(4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  greedy = np.asarray(generate(lm, prompts, LENGTHS, max_new_tokens=N).tokens)
  np.testing.assert_array_equal(run(3, top_k=1), greedy)
  np.testing.assert_array_equal(run(3, top_p=1e-6), greedy)
  # The streaming loop gives the same samples.
  streamed = np.stack([t for t, _ in generate_stream(lm, prompts, LENGTHS, max_new_tokens=N, temperature=2.0,
                                                     seed=3)], axis=1)
  np.testing.assert_array_equal(streamed, a)


def test_sample_token_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(lambda k, tk, tp: sample_token(logits, k, 1.0, tk, tp)[0], in_axes=(0, None, None)))
  assert set(np.asarray(draw(keys, 2, 1.0)).tolist()) == {1, 3}
  assert set(np.asarray(draw(keys, 0, 0.75)).tolist()) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 <= + 0.15
  freq = np.bincount(np.asarray(draw(keys, 0, 1.0)), minlength=5) / 2000
  np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.04)


def test_text_generation_stop_strings_and_streaming():
  tok = ByteTokenizer()
  lm = LM(ModelConfig(**{**BASE, "vocab_size": tok.vocab_size}), rngs=nnx.Rngs(0))
  cfg = GenerateConfig(max_new_tokens=8)
  plain = generate_text(lm, tok, ["Hello", "A"], cfg, window=32)
  pieces = {0: "", 1: ""}
  streamed = generate_text(lm, tok, ["Hello", "A"], cfg, window=32,
                           on_token=lambda r, s: pieces.__setitem__(r, pieces[r] + s))
  assert streamed == plain and [pieces[0], pieces[1]] == plain
  stop = plain[0][2:4]
  cut = generate_text(lm, tok, ["Hello", "A"], GenerateConfig(max_new_tokens=8, stop=(stop,)), window=32)
  assert cut[0] == plain[0][:plain[0].find(stop)]
  assert cut_at_stop("ab\ncd", ["\n", "c"]) == ("ab", True) and cut_at_stop("ab", ["x"]) == ("ab", False)


def test_bad_generation_inputs_are_one_line_errors():
  tok = ByteTokenizer()
  with pytest.raises(DataError, match="prompt 1 is 9 tokens .* window of 8"):
    encode_prompts(tok, ["ab", "abcdefgh"], window=8)
  with pytest.raises(ConfigError, match="GenerateConfig.top_p=0.0"):
    GenerateConfig(top_p=0.0)
  lm = LM(KINDS["dense"], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"lengths must be in \[1, T=3\]"):
    generate(lm, jnp.ones((2, 3), jnp.int32), jnp.array([0, 3]))


def test_memjax_generate_is_the_function_even_after_importing_the_command_module(prompts):
  import memjax
  import memjax.generate  # binds the package attribute to the command's module
  lm = LM(KINDS["dense"], rngs=nnx.Rngs(0))
  want = np.asarray(generate(lm, prompts, LENGTHS, max_new_tokens=N).tokens)
  np.testing.assert_array_equal(np.asarray(memjax.generate(lm, prompts, LENGTHS, max_new_tokens=N).tokens), want)
