"""The fused CPU value update (cpu.value_row_sums + cpu.value_adam, train.fused_value_update).

Oracles: numpy sums in lookup order and the Adam formulas for the kernels; the XLA formulation
(optax's dense chain, optim's row-sparse Adam) for whole train steps; lowering for TPU and CUDA
for the platform choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import cpu

needs_kernel = pytest.mark.skipif(not cpu.ffi_status()[0], reason="the C++ CPU kernels are not built")


def _lookups(seed, readers=2, b=3, t=5, lk=6, m=40, d=8):
  r = np.random.default_rng(seed)
  idx = r.integers(0, m, (readers, b, t, lk)).astype(np.int32)
  idx[0, 0, 0, :3] = 7  # a row read several times by one token
  w = r.standard_normal((readers, b, t, lk)).astype(np.float32)
  dy = r.standard_normal((readers, b, t, d)).astype(np.float32)
  return idx, w, dy


def _row_sums_reference(idx, w, dy, m):
  """Sums in lookup order, fp32, one lookup at a time (the kernel's order)."""
  d = dy.shape[-1]
  flat_idx, flat_w = idx.reshape(-1), w.reshape(-1)
  rows = dy.reshape(-1, d)
  per = flat_idx.size // rows.shape[0]
  g = np.zeros((m, d), np.float32)
  np.add.at(g, flat_idx, flat_w[:, None] * rows[np.arange(flat_idx.size) // per])  # in index order
  return g, np.bincount(flat_idx, minlength=m)


@needs_kernel
@pytest.mark.parametrize("m,b", [(40, 3), (5000, 3), (4096, 1200)])
def test_row_sums_equal_sums_in_lookup_order(m, b):
  """Counting sort (m=40), radix sort (5,000 rows > 4 x 1,024), counting sort in 2 chunks of
  lookups (72k lookups), each against numpy's in-order sums."""
  idx, w, dy = _lookups(0, m=m, b=b)
  rows, g, sq = jax.jit(lambda i, a, y: cpu.value_row_sums(i, a, y, m))(idx, w, dy)
  g_ref, counts = _row_sums_reference(idx, w, dy, m)
  read = np.flatnonzero(counts)
  u = min(idx.size, m)
  assert rows.shape == (u,) and g.shape == (u, dy.shape[-1])
  np.testing.assert_array_equal(np.asarray(rows), np.concatenate([read, np.full(u - read.size, m)]))
  # The same sequence of fp32 sums; the compiler may fuse each multiply-add (one rounding less).
  np.testing.assert_allclose(np.asarray(g)[:read.size], g_ref[read], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(g)[read.size:], 0.0)
  np.testing.assert_allclose(float(sq), float(np.sum(g_ref[read].astype(np.float64) ** 2)), rtol=1e-6)


def _adam_reference(table, mu, nu, g_dense, read, lr, div, mul, bc1, bc2, b1, b2, eps, wd, lazy):
  table, mu, nu = table.copy(), mu.copy(), nu.copy()
  for r in range(table.shape[0]):
    if lazy and not read[r]:
      continue
    gr = (g_dense[r] / np.float32(div)) * np.float32(mul) if read[r] else np.zeros_like(g_dense[r])
    mu[r] = np.float32(1 - b1) * gr + np.float32(b1) * mu[r]
    nu[r] = np.float32(1 - b2) * gr * gr + np.float32(b2) * nu[r]
    u = (mu[r] / np.float32(bc1)) / (np.sqrt(nu[r] / np.float32(bc2)) + np.float32(eps)) + np.float32(wd) * table[r]
    table[r] = table[r] + np.float32(-lr) * u
  return table, mu, nu


@needs_kernel
@pytest.mark.parametrize("lazy,in_place", [(True, True), (True, False), (False, True), (False, False)])
def test_adam_equals_the_formula_and_lazy_leaves_unread_rows(lazy, in_place):
  r = np.random.default_rng(1)
  m, d, u = 12, 5, 8
  table, mu = (r.standard_normal((m, d)).astype(np.float32) for _ in range(2))
  nu = r.random((m, d)).astype(np.float32)
  listed = np.sort(r.choice(m, 5, replace=False)).astype(np.int32)
  rows = np.concatenate([listed, np.full(u - listed.size, m, np.int32)])  # then padding
  g = r.standard_normal((u, d)).astype(np.float32)
  g_dense = np.zeros((m, d), np.float32)
  g_dense[listed] = g[:listed.size]
  read = np.isin(np.arange(m), listed)
  hyper = dict(b1=0.9, b2=0.95, eps=1e-8)
  lr, div, mul, bc1, bc2 = 0.01, 2.0, 0.5, 1 - 0.9**3, 1 - 0.95**3
  out = jax.jit(lambda *a: cpu.value_adam(*a, lr=lr, div=div, mul=mul, bc1=bc1, bc2=bc2, weight_decay=0.1,
                                           lazy=lazy, table_in_place=in_place, **hyper))(table, mu, nu, rows, g)
  want = _adam_reference(table, mu, nu, g_dense, read, lr, div, mul, bc1, bc2, 0.9, 0.95, 1e-8, 0.1, lazy)
  for got, ref in zip(out, want):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=1e-7)
  if lazy:
    for got, before in zip(out, (table, mu, nu)):
      np.testing.assert_array_equal(np.asarray(got)[~read], before[~read])  # bitwise untouched
  else:
    assert not np.allclose(np.asarray(out[1])[~read], mu[~read])  # moments decay everywhere


def _run(update, fused, steps=3, **model):
  from memjax.config_bridge import config_from_dict
  from memjax.train.step import make_step_fns
  from tests.helpers import random_batch, tiny_raw

  raw = tiny_raw(fused_value_update=fused, value_weight_decay=0.05)
  raw.model.memory.value_update = update
  for k, v in model.items():
    raw.model.memory[k] = v
  cfg = config_from_dict(raw).with_vocab(64)
  fns = make_step_fns(cfg.model, cfg.train)
  step = jax.jit(fns.train_step)
  state = jax.jit(fns.init)(0)
  text = step.lower(state, random_batch(0, 8, 64, 64)).as_text()
  metrics = []
  for s in range(steps):
    state, m = step(state, random_batch(s, 8, 64, 64, repeat=True))
    metrics.append({k: float(v) for k, v in m.items()})
  return state, metrics, text


@needs_kernel
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_fused_steps_equal_the_xla_update(update):
  """Three train steps with the fused kernels and with the XLA formulation (optax's dense chain or
  optim's row-sparse Adam) from the same start: the same tables, moments, parameters and metrics
  within fp32 rounding (the gradient's summation order differs)."""
  fused, f_metrics, f_text = _run(update, True)
  plain, p_metrics, p_text = _run(update, False)
  assert "memjax_value_adam" in f_text and "memjax_value_adam" not in p_text
  for key in ("loss", "value_grad_norm", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in f_metrics], [m[key] for m in p_metrics], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-6)


@needs_kernel
def test_the_fused_update_is_lowered_only_for_cpu():
  from memjax.config_bridge import config_from_dict
  from memjax.train.step import make_step_fns
  from tests.helpers import random_batch, tiny_raw

  for update in ("dense", "sparse"):
    raw = tiny_raw()
    raw.model.memory.value_update = update
    cfg = config_from_dict(raw).with_vocab(64)
    fns = make_step_fns(cfg.model, cfg.train)
    state = jax.eval_shape(fns.init, 0)
    batch = random_batch(0, 8, 64, 64)
    for platform, want in (("cpu", True), ("tpu", False), ("cuda", False)):
      text = jax.jit(fns.train_step).trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
      assert ("memjax_value_adam" in text) == want, (update, platform)
