"""Value updates: dense and row-sparse agree where they must; sparse Adam matches its written
semantics; the compiled sparse step holds no [slots, value_dim] temporary; training lowers the loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.train.step import make_step_fns
from memjax.config import LMMemoryConfig, MemoryConfig, ModelConfig, TrainConfig
from memjax.kernels.xla import distinct_rows
from memjax.optim import (SparseAdamState, chunked_sparse_adam_update, clip_rows, sparse_adam_init,
                          sparse_adam_update)


def _model_cfg(update, n_keys=16, value_dim=32, shared=True):
  mem = MemoryConfig(n_keys=n_keys, heads=2, k=4, key_dim=16, value_dim=value_dim)
  return ModelConfig(vocab_size=32, dim=32, num_layers=3, num_heads=2, head_dim=16, mlp_dim=64,
                     memory=LMMemoryConfig(layer=mem, layers=(0, 2), shared=shared, value_update=update))


def _batch(seed, b=4, t=12, vocab=32):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  tok[:, 3] = tok[:, 1]  # repeated tokens -> repeated slots across positions
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


@pytest.mark.parametrize("shared", [True, False])
def test_sgd_step_is_identical_with_dense_and_sparse_value_gradients(shared):
  tcfg = TrainConfig(steps=10)
  dense = make_step_fns(_model_cfg("dense", shared=shared), tcfg)
  sparse = make_step_fns(_model_cfg("sparse", shared=shared), tcfg)
  state = dense.init(0)
  batch = _batch(0)
  loss_d, _, gp_d, gv_d = jax.jit(dense.grads)(state, batch)
  loss_s, _, gp_s, gv_s = jax.jit(sparse.grads)({**state, "value_opt": None}, batch)
  assert float(loss_d) == float(loss_s)
  for a, b in zip(jax.tree.leaves(gp_d), jax.tree.leaves(gp_s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  lr = 0.5
  flat_values = {tuple(p): v[...] for p, v in nnx.to_flat_state(state["values"])}
  flat_grads = {tuple(p): g[...] for p, g in nnx.to_flat_state(gv_d)}
  assert len(gv_s) == (1 if shared else 2)
  for pool in sparse.pools:
    table = flat_values[pool.path]
    rows, row_grads = gv_s[pool.key]
    assert int(jnp.sum(rows < table.shape[0])) < table.shape[0]  # really sparse: not every row
    after_sparse = table.at[rows].add(-lr * row_grads, mode="drop")
    after_dense = table - lr * flat_grads[pool.path]
    np.testing.assert_allclose(after_sparse, after_dense, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(after_sparse - table).max()) > 0


def _numpy_sparse_adam(steps, m, d, lr, b1, b2, eps, wd):
  """The module docstring's semantics, restated with dense numpy arrays and explicit row loops."""
  values = np.ones((m, d))
  mu, nu = np.zeros((m, d)), np.zeros((m, d))
  for t, (rows, grads) in enumerate(steps, start=1):
    for r, g in zip(rows, grads):
      mu[r] = b1 * mu[r] + (1 - b1) * g
      nu[r] = b2 * nu[r] + (1 - b2) * g * g
      m_hat, v_hat = mu[r] / (1 - b1**t), nu[r] / (1 - b2**t)
      values[r] = values[r] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * values[r])
  return values, mu, nu


def test_sparse_adam_matches_its_documented_semantics():
  rng = np.random.default_rng(0)
  m, d, u = 12, 3, 5
  lr, b1, b2, eps, wd = 0.05, 0.9, 0.95, 1e-8, 0.1
  # Rows repeat across steps (2 and 5), fresh rows appear (9, 11), and padding (== m) is ignored.
  row_lists = [[2, 5, 7, m, m], [2, 5, 9, m, m], [5, 11, 0, 2, m], [1, m, m, m, m]]
  steps = []
  for rows in row_lists:
    grads = rng.standard_normal((u, d))
    grads[np.array(rows) == m] = 0.0
    steps.append((rows, grads))
  values = jnp.ones((m, d), jnp.float32)
  state = sparse_adam_init(values)
  update = jax.jit(lambda v, s, r, g: sparse_adam_update(v, s, r, g, lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  for rows, grads in steps:
    values, state = update(values, state, jnp.array(rows, jnp.int32), jnp.asarray(grads, jnp.float32))
  want_v, want_m, want_n = _numpy_sparse_adam([(
      [r for r in rows if r < m], [g for r, g in zip(rows, grads) if r < m]) for rows, grads in steps],
      m, d, lr, b1, b2, eps, wd)
  np.testing.assert_allclose(values, want_v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.mu, want_m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.nu, want_n, rtol=1e-5, atol=1e-8)
  untouched = [r for r in range(m) if all(r not in rows for rows, _ in steps)]
  assert untouched and np.all(np.asarray(values)[untouched] == 1.0)  # never read: never moved
  assert int(state.count) == len(steps)


def test_clip_rows_by_global_norm():
  g = jnp.array([[3.0, 0.0], [0.0, 4.0]])
  clipped, norm = clip_rows(g, 1.0)
  assert float(norm) == pytest.approx(5.0)
  np.testing.assert_allclose(clipped, g / 5.0, rtol=1e-6)
  same, _ = clip_rows(g, 10.0)
  np.testing.assert_array_equal(same, g)


def _temp_bytes(update, fused=True):
  cfg = _model_cfg(update, n_keys=128, value_dim=64)  # table 16384 x 64 fp32 = 4 MiB
  # fewer lookups than slots
  fns = make_step_fns(cfg, TrainConfig(steps=10, batch_size=2, seq_len=8, fused_value_update=fused))
  abstract = jax.eval_shape(fns.init, 0)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(0, b=2, t=8))
  compiled = jax.jit(fns.train_step, donate_argnums=0).trace(abstract, batch).lower().compile()
  table_bytes = cfg.memory.layer.num_slots * cfg.memory.layer.value_dim * 4
  return compiled.memory_analysis().temp_size_in_bytes, table_bytes, compiled.as_text()


def test_compiled_sparse_step_holds_no_table_sized_temporary():
  shape = "f32[16384,64]"
  for fused in (True, False):  # the fused CPU kernels and the XLA formulation
    temp, table_bytes, hlo = _temp_bytes("sparse", fused)
    assert temp < table_bytes / 4, (fused, temp, table_bytes)
    # Only the table and its two moments carry the [slots, value_dim] shape, as parameters/outputs
    # updated in place: no broadcast/zeros of that shape anywhere in the program.
    assert not any(shape in line and ("broadcast(" in line or "constant(" in line) for line in hlo.splitlines())
  # The contrast: XLA's dense step needs the dense gradient (at least one table-sized temporary).
  dense_temp, _, dense_hlo = _temp_bytes("dense", fused=False)
  assert dense_temp >= table_bytes
  assert any(shape in line and "broadcast(" in line for line in dense_hlo.splitlines())


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_loss_falls_on_a_tiny_run(update):
  fns = make_step_fns(_model_cfg(update), TrainConfig(steps=40, lr=3e-3, warmup_steps=4))
  state = fns.init(0)
  step = jax.jit(fns.train_step, donate_argnums=0)
  batches = [_batch(i % 2) for i in range(40)]
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_distinct_rows_numbers_the_rows_in_order():
  rows = jnp.array([7, 3, 9, 3, 9, 9, 0], jnp.int32)  # 9 = num_slots: padding
  segment, distinct = distinct_rows(rows, 9, multiple=3)
  assert distinct.tolist() == [0, 3, 7, 9] + [9] * 5  # size min(7, 10) = 7, rounded up to 9
  np.testing.assert_array_equal(distinct[segment], rows)


def test_chunked_sparse_adam_equals_one_update():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
  state = SparseAdamState(jnp.asarray(rng.normal(size=(40, 6)) ** 2, jnp.float32) * 0.1,
                          jnp.asarray(rng.normal(size=(40, 6)) ** 2, jnp.float32), jnp.array(3, jnp.int32))
  rows = jnp.asarray(np.concatenate([rng.permutation(40)[:21], [40, 40, 40]]), jnp.int32)  # 24 = 4 x 6
  grads = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
  adam = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  want_t, want_s = sparse_adam_update(table, state, rows, 0.5 * grads, 1e-2, **adam)
  got_t, got_s = jax.jit(lambda t, s: chunked_sparse_adam_update(
      t, s, rows, grads, 1e-2, 0.5, chunk_rows=6, **adam))(table, state)
  for got, want in ((got_t, want_t), (got_s.mu, want_s.mu), (got_s.nu, want_s.nu)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert int(got_s.count) == int(want_s.count) == 4


@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_give_the_gradients_of_the_whole_batch(update, k):
  batch = _batch(0, b=8)
  batch["loss_mask"][1, :5] = 0  # microbatches with different token counts: the mean is token-weighted
  whole = make_step_fns(_model_cfg(update), TrainConfig(steps=10))
  split = make_step_fns(_model_cfg(update), TrainConfig(steps=10, microbatches=k))
  state = whole.init(0)
  loss_w, _, gp_w, gv_w = jax.jit(whole.grads)(state, batch)
  loss_s, _, gp_s, gv_s = jax.jit(split.grads)(state, batch)
  np.testing.assert_allclose(float(loss_s), float(loss_w), rtol=1e-6)
  chex.assert_trees_all_close(gp_s, gp_w, rtol=1e-5, atol=1e-6)
  if update == "dense":
    chex.assert_trees_all_close(gv_s, gv_w, rtol=1e-5, atol=1e-6)
  else:
    for key in gv_w:
      np.testing.assert_array_equal(gv_s[key][0], gv_w[key][0])  # the same rows
      np.testing.assert_allclose(gv_s[key][1], gv_w[key][1], rtol=1e-5, atol=1e-6)
  step = jax.jit(split.train_step)
  _, metrics = step(state, batch)
  assert float(metrics["loss"]) == pytest.approx(float(loss_w), rel=1e-6)


def test_sparse_value_update_with_more_lookups_than_slots_touches_the_same_rows():
  """N lookups > M slots: Adam runs on the first M row-gradient entries (all distinct rows are
  there); the result equals Adam over all N entries (the padding is ignored) and the dense oracle."""
  from memjax.kernels.embedding_bag import embedding_bag_reference, embedding_bag_row_grads
  from memjax.optim import clip_rows, sparse_adam_init, sparse_adam_update, sparse_value_update
  rng = np.random.default_rng(0)
  m, dv = 40, 8
  idx = jnp.asarray(rng.integers(0, m // 2, (2, 3, 5, 6)), jnp.int32)  # [R, B, T, H*k]: 180 lookups, <= 20 rows
  wts = jnp.asarray(rng.random((2, 3, 5, 6)), jnp.float32)
  dys = jnp.asarray(rng.standard_normal((2, 3, 5, dv)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((m, dv)), jnp.float32)
  opt = sparse_adam_init(table)
  adam = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
  got, _, norm2 = sparse_value_update(None, table, opt, idx, wts, dys, 0.1, clip=1.0, backend="xla", **adam)
  rows, grads = embedding_bag_row_grads(idx, wts, dys, m, backend="xla")
  assert rows.shape[0] == idx.size > m
  grads, norm = clip_rows(grads, 1.0)
  want, _ = sparse_adam_update(table, opt, rows, grads, 0.1, **adam)
  np.testing.assert_array_equal(got, want)
  dense = jax.grad(lambda v: jnp.vdot(embedding_bag_reference(v, idx, wts), dys))(table)
  np.testing.assert_allclose(float(norm2), float(jnp.sum(dense**2)), rtol=1e-5)
  read = np.zeros(m, bool)
  read[np.asarray(idx).ravel()] = True
  np.testing.assert_array_equal(np.asarray(got)[~read], np.asarray(table)[~read])  # unread rows untouched
  assert np.all(np.asarray(got)[read] != np.asarray(table)[read])


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_update_barrier_changes_the_schedule_not_the_numbers(update):
  """``train.update_barrier`` puts the sparse update's inputs behind an optimization barrier (the TPU
  compiler then cannot overlap the update's buffers with the backward's); the dense step has none. The
  numbers are the same either way."""
  states, texts = [], []
  for barrier in (True, False):
    fns = make_step_fns(_model_cfg(update), TrainConfig(steps=10, warmup_steps=1, update_barrier=barrier,
                                                        fused_value_update=False))
    step = jax.jit(fns.train_step)
    state = fns.init(0)
    texts.append(step.lower(state, _batch(0)).as_text())
    for i in range(2):
      state, _ = step(state, _batch(i))
    states.append(state)
  assert ("optimization_barrier" in texts[0]) == (update == "sparse")
  assert "optimization_barrier" not in texts[1]
  chex.assert_trees_all_close(states[0], states[1], rtol=1e-6, atol=1e-7)
