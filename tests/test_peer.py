"""PEER blocks: the fast path against brute force (outputs, experts, gradients), the formulas against the
implementation, the config's errors, and a tiny model with a PEER block training through the train step."""

import contextlib
import dataclasses
import io
import json
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import one_error_line, subprocess_env, train_py
from memjax.config import ConfigError, LMMemoryConfig, MemoryConfig, ModelConfig, PEERConfig, TrainConfig
from memjax.config_bridge import config_from_dict
from memjax.memory.product_keys import gathered_xla_gradient
from memjax.model import LM, split_model
from memjax.peer import PEER, peer_forward, peer_forward_reference
from memjax.sharding import LOGICAL_AXES

C = 24
SMALL = PEERConfig(num_experts=16 * 16, heads=3, top_k=4, key_dim=8)


def _cfg(**flags):
  return PEERConfig(**{**SMALL.__dict__, **flags})


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _fast(layer, topk="auto", backend="auto"):
  cfg = layer.config
  return lambda x, arrays: peer_forward(x, **arrays, top_k=cfg.top_k, activation=cfg.activation, gate=cfg.gate,
                                        topk=topk, backend=backend)


def _reference(layer):
  cfg = layer.config
  return lambda x, arrays: peer_forward_reference(x, **arrays, top_k=cfg.top_k, activation=cfg.activation,
                                                  gate=cfg.gate)


CASES = [  # (config flags, top-k backend, embedding-bag backend)
    (dict(), "auto", "auto"),
    (dict(), "xla", "xla"),
    (dict(shared_keys=False, activation="relu", gate="sigmoid"), "auto", "xla_loop"),
    (dict(qk_norm=True, activation="silu"), "xla", "auto"),
    (dict(qk_norm=True, shared_keys=False, top_k=16), "auto", "auto"),  # k = n: the whole grid
]


@pytest.mark.parametrize("flags,topk,backend", CASES)
def test_fast_path_equals_brute_force(flags, topk, backend):
  layer = PEER(C, _cfg(**flags), rngs=nnx.Rngs(1))
  x = _x((2, 9, C), 1)
  fast = jax.jit(_fast(layer, topk, backend))(x, layer.arrays())
  ref = jax.jit(_reference(layer))(x, layer.arrays())
  np.testing.assert_array_equal(fast.indices, ref.indices)  # the same experts, in the same order
  np.testing.assert_allclose(fast.gates, ref.gates, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(fast.out, ref.out, rtol=1e-5, atol=1e-6)
  assert fast.out.shape == x.shape and fast.indices.shape == (2, 9, layer.config.heads, layer.config.top_k)
  assert float(jnp.abs(fast.out).max()) > 0


def test_module_read_is_peer_forward_of_its_parameters_and_heads_are_distinct():
  layer = PEER(C, _cfg(qk_norm=True), rngs=nnx.Rngs(2))
  x = _x((7, C), 2)
  r = layer.read(x)
  np.testing.assert_array_equal(r.indices, _reference(layer)(x, layer.arrays()).indices)
  assert not np.array_equal(r.indices[:, 0], r.indices[:, 1])  # each head has its own query


@pytest.mark.parametrize("flags,topk,backend", [CASES[0], CASES[2], CASES[3]])
def test_gradients_match_the_reference(flags, topk, backend):
  layer = PEER(C, _cfg(**flags), rngs=nnx.Rngs(3))
  x = _x((11, C), 3)
  cot = _x((11, C), 4)

  def loss(f):
    return lambda x, arrays: jnp.sum(f(x, arrays).out * cot)

  g_fast = jax.jit(jax.grad(loss(_fast(layer, topk, backend)), argnums=(0, 1)))(x, layer.arrays())
  g_ref = jax.jit(jax.grad(loss(_reference(layer)), argnums=(0, 1)))(x, layer.arrays())
  np.testing.assert_allclose(g_fast[0], g_ref[0], rtol=1e-4, atol=1e-6)
  for name in g_ref[1]:
    assert float(jnp.abs(g_ref[1][name]).max()) > 0, name  # every parameter gets a gradient
    np.testing.assert_allclose(g_fast[1][name], g_ref[1][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_tokens_are_independent():
  layer = PEER(C, SMALL, rngs=nnx.Rngs(4))
  jac = jax.jit(jax.jacrev(lambda x: layer(x)))(_x((5, C), 5))  # [T, C, T, C]
  norms = jnp.abs(jac).sum(axis=(1, 3))
  assert float((norms * (1 - jnp.eye(5))).max()) == 0.0 and float(jnp.diag(norms).min()) > 0.0


def test_lm_with_peer_blocks_decodes_like_its_forward_pass():
  cfg = _model_cfg(peer_layers=(0, 2))
  model = LM(cfg, rngs=nnx.Rngs(5))
  tokens = jnp.array([[3, 4, 5, 6], [7, 8, 9, 1]], jnp.int32)
  logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert len(aux["peer"]) == 2 and aux["peer"][0].indices.shape == (2, 4, SMALL.heads, SMALL.top_k)
  positions = jnp.broadcast_to(jnp.arange(4)[None], (2, 4))
  cached, _, _ = nnx.jit(lambda m, t: m.decode(t, positions, m.init_cache(2, 4)))(model, tokens)
  np.testing.assert_allclose(cached, logits, rtol=1e-5, atol=1e-5)
  remat = LM(dataclasses.replace(cfg, remat="full"), rngs=nnx.Rngs(5))  # blocks under jax.checkpoint
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t)[0])(remat, tokens), logits, rtol=1e-6, atol=1e-6)


# ----- formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [dict(), dict(shared_keys=False), dict(qk_norm=True),
                                   dict(qk_norm=True, shared_keys=False)])
def test_param_count_matches_the_param_tree(flags):
  cfg = _cfg(**flags)
  layer = PEER(C, cfg, rngs=nnx.Rngs(0))
  leaves = dict((tuple(map(str, p)), v[...]) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)))
  assert sum(int(np.prod(v.shape)) for v in leaves.values()) == cfg.param_count(C)
  assert leaves[("down",)].size + leaves[("up",)].size == cfg.expert_params(C)
  for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim and all(a in LOGICAL_AXES for a in axes), path


def _model_cfg(peer_layers=(1,), memory_layers=(), **peer):
  return ModelConfig(vocab_size=32, dim=C, num_layers=3, num_heads=2, head_dim=12, mlp_dim=48,
                     memory=LMMemoryConfig(layer=MemoryConfig(n_keys=8, heads=2, k=4, key_dim=8, value_dim=C),
                                           layers=memory_layers, value_update="dense"),
                     peer=PEERConfig(**{**SMALL.__dict__, "layers": peer_layers, **peer}))


def test_model_param_counts_include_peer_blocks():
  cfg = _model_cfg(peer_layers=(0, 2), memory_layers=(1,), qk_norm=True)
  model = LM(cfg, rngs=nnx.Rngs(0))
  assert [b.kind for b in model.blocks] == ["peer", "memory", "peer"]
  assert cfg.block_kind(0) == "peer"
  counts = cfg.param_counts()
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))) == counts["total"]
  assert counts["experts"] == 2 * cfg.peer.expert_params(C)
  dense = dataclasses.replace(cfg, peer=PEERConfig())
  per_block = 2 * 3 * C * cfg.mlp_dim
  assert cfg.flops_per_token(16) - dense.flops_per_token(16) == 2 * (cfg.peer.flops_per_token(C) - per_block)


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, its sub-jaxprs included (jit, custom_vjp)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          total += _dot_flops(inner)
  return total


@pytest.mark.parametrize("flags", [dict(), dict(shared_keys=False, top_k=8)])
def test_flop_formula_matches_the_matmuls_of_the_implementation(flags):
  cfg = _cfg(**flags)
  layer = PEER(C, cfg, rngs=nnx.Rngs(0))
  tokens = 10
  # The "xla" top-k in GPU's form (its gradient through the gathered sub-keys; on CPU it would take the
  # dense-score picks, whose two platform branches the jaxpr would both hold).
  with gathered_xla_gradient():
    jaxpr = jax.make_jaxpr(_fast(layer, "xla", "xla"))(_x((tokens, C)), layer.arrays()).jaxpr
  terms = cfg.flops_breakdown(C)
  h, k, dk = cfg.heads, cfg.top_k, cfg.key_dim
  # Besides the formula's matmuls, the forward recomputes the k chosen scores from their sub-keys for
  # their gradient (2 H k Dk; the value is the selection's): an implementation cost the formula,
  # like MemoryConfig's, leaves out.
  matmuls = terms["query"] + terms["key_scores"] + terms["experts_down"] + terms["experts_up"]
  assert _dot_flops(jaxpr) == tokens * (matmuls + 2 * h * k * dk)
  assert terms["experts_down"] == terms["experts_up"] == 2 * C * h * k  # 2 C per expert, each way
  assert cfg.flops_per_token(C) == sum(terms.values())


def test_paper_size_eval_shape_matches_the_formula():
  cfg = PEERConfig(num_experts=1024**2, heads=8, top_k=16, key_dim=256)
  abstract = nnx.eval_shape(lambda: PEER(1024, cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == cfg.param_count(1024)
  out = jax.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((2, 8, 1024), jnp.float32))
  assert out.shape == (2, 8, 1024)


# ----- config errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer,field,says", [
    ({"num_experts": 1000}, "model.peer.num_experts", "perfect square"),
    ({"num_experts": 64, "top_k": 9}, "model.peer.top_k", "sqrt(num_experts)=8"),
    ({"key_dim": 7}, "model.peer.key_dim", "even"),
    ({"activation": "tanh"}, "model.peer.activation", "allowed: ['gelu', 'relu', 'silu']"),
    ({"gate": "relu"}, "model.peer.gate", "allowed: ['softmax', 'sigmoid']"),
    ({"heads": 0}, "model.peer.heads", "positive int"),
    ({"layers": "9"}, "model.peer.layers", "num_layers=4"),
    ({"layers": "2"}, "model.peer.layers", "overlaps memory.layers at [2]"),
])
def test_bad_values_name_the_dotted_field(peer, field, says):
  raw = {"model": {"num_layers": 4, "memory": {"layers": "2"}, "peer": peer}}
  with pytest.raises(ConfigError) as e:
    config_from_dict(raw)
  assert e.value.path == field and says in str(e.value), str(e.value)


def test_a_block_cannot_be_moe_and_peer():
  with pytest.raises(ConfigError, match=r"ModelConfig\.peer\.layers=\(1,\) overlaps moe\.layers at \[1\]"):
    ModelConfig(num_layers=3, moe=dataclasses.replace(ModelConfig().moe, layers=(1,)), peer=PEERConfig(layers=(1,)))


# ----- training ---------------------------------------------------------------------------------------


def test_a_model_with_a_peer_block_trains_through_the_train_step():
  from memjax.train.step import make_step_fns
  cfg = _model_cfg(peer_layers=(1,), memory_layers=(2,))
  fns = make_step_fns(cfg, TrainConfig(steps=20, batch_size=4, seq_len=12, lr=1e-2, warmup_steps=2))
  state = fns.init(0)
  # The expert tables are ordinary parameters (the AdamW group of train.lr / weight_decay / clip), not
  # value tables: only the memory block's pool is in ``values``.
  params = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])}
  values = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(state["values"])}
  assert {("blocks", "1", "ffn", "down"), ("blocks", "1", "ffn", "up")} <= params
  assert not any("down" in p or "up" in p for p in values) and len(values) == 1
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 32, (4, 13)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((4, 12), np.float32),
           "segment_ids": np.ones((4, 12), np.int32), "positions": np.tile(np.arange(12, dtype=np.int32), (4, 1))}
  down0 = np.asarray(state["params"]["blocks"][1]["ffn"]["down"][...])
  step = jax.jit(fns.train_step)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert not np.allclose(state["params"]["blocks"][1]["ffn"]["down"][...], down0)
  (experts, gates), = jax.jit(fns.eval_step)(state, batch)["peer_lookups"]  # one PEER block's retrieval
  assert experts.shape == gates.shape == (4, 12, SMALL.heads, SMALL.top_k)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-5)


def test_train_py_runs_configs_peer(tmp_path):
  cmd = train_py("--config.train.steps=3", "--config.train.batch_size=4", "--config.data.kb=tiny",
                 "--config.eval.qa_from_kb=false", "--config.eval.eval_batches=1",
                 config="peer", data_dir=tmp_path / "data", workdir=tmp_path / "w")
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert "done: step 3" in out.stdout + out.stderr
  final = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()][-1]
  assert 0.0 < final["peer/used"] <= 1.0 and final["peer/kl"] >= 0.0  # expert usage, like the memory's


def test_train_py_bad_peer_value_is_one_line_exit_2(tmp_path):
  from memjax.train import main as cli
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["train.py", "--config.model.peer.num_experts=99", f"--workdir={tmp_path / 'w'}"])
  assert code == 2
  assert "model.peer.num_experts=99" in one_error_line(err.getvalue())
  assert not (tmp_path / "w").exists()
