"""The LM: causality through gradients, document masking, parameter formula, MoE routing and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import moe
from memjax.config import LMMemoryConfig, MemoryConfig, ModelConfig, MoEConfig, ConfigError, parse_layers
from memjax.model import LM

MEM = MemoryConfig(n_keys=8, heads=2, k=4, key_dim=16, value_dim=32)


def _cfg(**kw):
  base = dict(vocab_size=40, dim=32, num_layers=4, num_heads=2, head_dim=16, mlp_dim=64,
              memory=LMMemoryConfig(layer=MEM, layers=(1, 3)), moe=MoEConfig(layers=(2,), num_experts=4))
  return ModelConfig(**{**base, **kw})


def test_lm_is_causal():
  cfg = _cfg(num_layers=2, memory=LMMemoryConfig(layer=MEM, layers=(0,)), moe=MoEConfig(layers=(1,), num_experts=4))
  model = LM(cfg, rngs=nnx.Rngs(0))
  t = 10
  emb = jax.random.normal(jax.random.key(1), (1, t, 32))

  # Differentiate position s's logits w.r.t. the input embeddings of every position (embedding lookup
  # replaced by feeding embeddings through the same blocks).
  def logits_from_embeddings(x):
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    segment_ids = jnp.ones((1, t), jnp.int32)  # one document: causality is the attention's own
    for block in model.blocks:
      x, _ = block(x, positions, segment_ids)
    return model.final_norm(x) @ model.embed[...].T

  jac = jax.jit(jax.jacrev(lambda x: logits_from_embeddings(x)[0].sum(-1)))(emb)  # [T, 1, T, C]
  influence = jnp.abs(jac[:, 0]).sum(-1)  # [T out, T in]
  future = jnp.triu(jnp.ones((t, t)), k=1)
  assert float((influence * future).max()) == 0.0
  assert float(influence[np.tril_indices(t)].min()) > 0.0  # and every past position does matter


def test_token_gradients_never_flow_from_the_future():
  # The same check through the token path: perturbing token t+1.. never changes logits at <= t.
  model = LM(_cfg(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 40)
  run = nnx.jit(lambda m, tok: m(tok)[0])
  base = run(model, tokens)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % 40)
  after = run(model, changed)
  np.testing.assert_array_equal(base[:, :7], after[:, :7])
  assert float(jnp.abs(base[:, 7:] - after[:, 7:]).max()) > 0


def test_segments_do_not_attend_across_documents():
  model = LM(_cfg(memory=LMMemoryConfig(), moe=MoEConfig()), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, 40)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  packed, _ = nnx.jit(lambda m: m(tokens, seg, pos))(model)
  alone, _ = nnx.jit(lambda m: m(tokens[:, 5:]))(model)  # the second document on its own
  np.testing.assert_allclose(packed[:, 5:], alone, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False),
                                dict(memory=LMMemoryConfig(layer=MEM, layers=(0, 3), shared=False))])
def test_param_count_matches_formula(kw):
  cfg = _cfg(**kw)
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == cfg.param_counts()["total"]


def test_memory_layers_placement():
  assert parse_layers("x", "centered:3", 24) == (4, 12, 20)
  assert parse_layers("x", "4, 12,20", 24) == (4, 12, 20)
  assert parse_layers("x", "", 24) == ()
  with pytest.raises(ConfigError, match="model.memory.layers"):
    parse_layers("model.memory.layers", "30", 24)
  with pytest.raises(ConfigError, match="overlaps"):
    _cfg(moe=MoEConfig(layers=(1,)))


# ----- MoE ---------------------------------------------------------------------------------------


def test_routes_each_token_to_its_top_k_experts():
  logits = jnp.array([[5.0, 1.0, 0.0, 4.0], [0.0, 3.0, 6.0, 1.0]])
  probs, gates, experts = moe.route(logits, 2)
  assert experts.tolist() == [[0, 3], [2, 1]]
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  p = np.exp([5.0, 4.0]) / np.exp([5.0, 4.0]).sum()
  np.testing.assert_allclose(gates[0], p, rtol=1e-5)


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
  e = 4
  uniform = jnp.full((8, e), 1.0 / e)
  balanced = jnp.arange(8)[:, None] % e
  assert float(moe.balance_loss(uniform, balanced)) == pytest.approx(1.0)
  collapsed_probs = jax.nn.one_hot(jnp.zeros(8, jnp.int32), e)
  assert float(moe.balance_loss(collapsed_probs, jnp.zeros((8, 1), jnp.int32))) == pytest.approx(e)


def test_moe_forward_matches_a_per_token_loop():
  rng = np.random.default_rng(0)
  n, c, e, f, k = 12, 8, 4, 16, 2
  x = jnp.asarray(rng.standard_normal((n, c)), jnp.float32)
  router = jnp.asarray(rng.standard_normal((c, e)), jnp.float32)
  wg, wu = (jnp.asarray(rng.standard_normal((e, c, f)), jnp.float32) for _ in range(2))
  wd = jnp.asarray(rng.standard_normal((e, f, c)), jnp.float32)
  out, _, dropped = moe.moe_forward(x, router, wg, wu, wd, top_k=k, capacity_factor=float(e))  # no drops
  assert float(dropped) == 0.0
  _, gates, experts = moe.route(x @ router, k)
  want = np.zeros((n, c), np.float32)
  for i in range(n):
    for j in range(k):
      ex = int(experts[i, j])
      h = jax.nn.silu(x[i] @ wg[ex]) * (x[i] @ wu[ex])
      want[i] += float(gates[i, j]) * np.asarray(h @ wd[ex])
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_moe_capacity_drops_overflow_in_token_order():
  # All tokens pick expert 0 first; with capacity 3, only the first 3 tokens get it.
  experts = jnp.array([[0, 1]] * 5)
  slots = moe.dispatch_slots(experts, 2, 3)
  assert slots[:, 0].tolist() == [0, 1, 2, 6, 6]  # 6 = E * S: dropped
  assert slots[:, 1].tolist() == [3, 4, 5, 6, 6]


# ----- rematerialisation and bf16 compute -------------------------------------------------------------

import chex  # noqa: E402

from memjax.config import TrainConfig  # noqa: E402
from memjax.train.step import make_step_fns  # noqa: E402


def _lm_cfg(update="sparse", **model):
  mem = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=16, value_dim=32)
  return ModelConfig(vocab_size=32, dim=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64,
                     memory=LMMemoryConfig(layer=mem, layers=(0, 2), value_update=update), **model)


def _batch(b=4, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, 32, (b, t + 1)).astype(np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("remat", ["full", "matmuls"])
def test_remat_gives_the_same_gradients(update, remat):
  batch = _batch()
  plain = make_step_fns(_lm_cfg(update), TrainConfig(steps=10))
  remat_fns = make_step_fns(_lm_cfg(update, remat=remat), TrainConfig(steps=10))
  state = plain.init(0)
  want, got = jax.jit(plain.grads)(state, batch), jax.jit(remat_fns.grads)(state, batch)
  assert float(got[0]) == float(want[0])
  chex.assert_trees_all_close(got[2], want[2], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got[3], want[3], rtol=1e-5, atol=1e-6)
  # That it keeps less is checked on the TPU compiler (tests/test_compile.py): XLA's CPU buffer
  # assignment shows almost no difference.


def test_bf16_compute_trains_like_fp32_with_fp32_master_weights():
  # Tolerance: after 30 steps the bf16 run's loss is within 2% of the fp32 run's (bf16 keeps ~3
  # significant digits per matmul; the loss and the optimizer run in fp32).
  losses = {}
  for dtype in ("float32", "bfloat16"):
    fns = make_step_fns(_lm_cfg("sparse", dtype=dtype), TrainConfig(steps=30, lr=3e-3, warmup_steps=3))
    state = fns.init(0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    step = jax.jit(fns.train_step, donate_argnums=0)
    curve = []
    for i in range(30):
      state, m = step(state, _batch(seed=i % 3))
      curve.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    losses[dtype] = curve
  assert losses["bfloat16"] != losses["float32"]  # bf16 really ran
  assert losses["float32"][-1] < 0.8 * losses["float32"][0]
  assert abs(losses["bfloat16"][-1] - losses["float32"][-1]) <= 0.02 * losses["float32"][-1], losses
