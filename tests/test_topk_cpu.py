"""The product-key top-k's C++ CPU kernel (kernels/topk.py, cpu_ffi.cc) against its XLA formulation.

The kernel must return the XLA path's arrays bit for bit (scores as fp32 bit patterns, i and j
exactly), ties and NaN included, and ``product_key_topk`` must keep its slots and gradients.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from memjax import product_key_topk, product_key_topk_reference
from memjax.kernels import cpu, topk

FFI_OK, FFI_MESSAGE = cpu.ffi_status()
needs_kernel = pytest.mark.skipif(not FFI_OK, reason=f"C++ CPU kernels unavailable: {FFI_MESSAGE}")
TARGET = "memjax_product_topk"


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def _assert_same(got, want):
  """(scores, i, j) equal bit for bit: fp32 scores compared as bit patterns (NaN, -0 included)."""
  for name, g, w in zip(("scores", "i", "j"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
    np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=name)


def _both(s1, s2, k, wrap=jax.jit):
  kernel = wrap(lambda a, b: topk.product_topk_from_scores(a, b, k, backend="cpu"))(s1, s2)
  xla = wrap(lambda a, b: topk.product_topk_from_scores(a, b, k, backend="xla"))(s1, s2)
  return kernel, xla


@needs_kernel
@pytest.mark.parametrize("wrap", [jax.jit, lambda f: f], ids=["jit", "eager"])
@pytest.mark.parametrize("lead,n,k", [
    ((3, 2), 256, 32),   # the knowledge sweep's shape, per token and head
    ((5,), 100, 100),    # k == n
    ((4,), 37, 1),       # k == 1, odd n
    ((6,), 257, 31),     # odd n and k
    ((3,), 33, 33),      # odd n, k == n
    ((2, 3), 1, 1),      # one sub-key
    ((3,), 1024, 128),   # the largest k with the group pre-cut (k <= 128, n >= 8 * k)
    ((3,), 1100, 129),   # the smallest k without it
    ((2,), 2**15, 32),   # the largest n, few rows
])
def test_kernel_equals_xla_on_random_scores(lead, n, k, wrap):
  rng = np.random.default_rng(n * 100 + k)
  s1, s2 = (rng.standard_normal((*lead, n)).astype(np.float32) for _ in range(2))
  kernel, xla = _both(s1, s2, k, wrap=wrap)
  assert kernel[0].shape == (*lead, k)
  _assert_same(kernel, xla)
  # The contract itself: sorted descending, each score the fp32 sum of its sub-keys' scores.
  scores, i, j = map(np.asarray, kernel)
  assert np.all(np.diff(scores, axis=-1) <= 0)
  np.testing.assert_array_equal(scores, np.take_along_axis(s1, i, -1) + np.take_along_axis(s2, j, -1))


@needs_kernel
@pytest.mark.parametrize("n,k,values", [(64, 16, 3), (256, 32, 5), (40, 40, 2), (300, 7, 1), (1024, 128, 40)])
def test_kernel_equals_xla_with_many_ties(n, k, values):
  rng = np.random.default_rng(n + k)
  s1, s2 = (rng.integers(-values, values + 1, (50, n)).astype(np.float32) for _ in range(2))
  _assert_same(*_both(s1, s2, k))


@needs_kernel
def test_ties_go_to_the_lower_index():
  # All scores equal: half 1 gives sub-keys 0..k-1 in order, and every grid sum ties, so the
  # lowest candidate positions a * k + b win: a = 0, b = 0..k-1.
  n, k = 10, 4
  scores, i, j = topk.product_topk_from_scores(jnp.zeros((1, n)), jnp.zeros((1, n)), k, backend="cpu")
  assert i.tolist() == [[0, 0, 0, 0]] and j.tolist() == [[0, 1, 2, 3]] and scores.tolist() == [[0.0] * k]


@needs_kernel
def test_special_values_follow_xla_order():
  # XLA's order: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN; inf + -inf = NaN (x86: -NaN).
  s1 = np.array([[1.0, -0.0, 0.0, -np.nan, -np.inf, 2.0, np.inf]], np.float32)
  s2 = np.array([[-0.0] + [-np.inf] * 6], np.float32)
  kernel, xla = _both(s1, s2, 7)
  _assert_same(kernel, xla)
  scores, i, j = kernel
  want = np.array([np.inf, 2.0, 1.0, 0.0, -0.0, -np.inf, -np.inf], np.float32)
  np.testing.assert_array_equal(_bits(scores[0]), _bits(want))  # +0 above -0
  assert i[0].tolist() == [6, 5, 0, 2, 1, 5, 5] and j[0].tolist() == [0, 0, 0, 0, 0, 1, 2]
  # +NaN ranks above +inf.
  scores, i, _ = topk.product_topk_from_scores(jnp.array([1.0, np.nan, np.inf]), jnp.zeros(3), 1, backend="cpu")
  assert np.isnan(scores[0]) and int(i[0]) == 1


@needs_kernel
def test_a_sum_of_two_nans_keeps_the_first():
  # top1 = [+NaN, 0], top2 = [1, -NaN]: (0, 1) = +NaN + -NaN = +NaN ties (0, 0) = +NaN + 1 and wins
  # over (1, 0) = 1; were it -NaN, (1, 0) would be second. Jitted XLA agrees.
  s1, s2 = np.array([[np.nan, 0.0]], np.float32), np.array([[-np.nan, 1.0]], np.float32)
  kernel, xla = _both(s1, s2, 2)
  _assert_same(kernel, xla)
  assert kernel[1].tolist() == [[0, 0]] and kernel[2].tolist() == [[1, 0]]
  assert _bits(kernel[0]).tolist() == [[0x7FC00000, 0x7FC00000]]


@needs_kernel
@pytest.mark.parametrize("n,k", [(16, 4), (16, 16), (40, 8), (7, 1), (64, 32)])
def test_kernel_equals_xla_with_nan_inf_zeros_and_denormals(n, k):
  special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39,
                      3.4e38, -3.4e38, 1.0, -1.0], np.float32)
  rng = np.random.default_rng(n * k)
  s1, s2 = (rng.choice(special, (100, n)) for _ in range(2))
  for s in (s1, s2):  # about half of the entries ordinary
    mask = rng.random(s.shape) < 0.5
    s[mask] = rng.standard_normal(int(mask.sum())).astype(np.float32)
  _assert_same(*_both(s1, s2, k))


def _memory(seed, tokens, heads, n, dk, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((tokens, heads, dk)), dtype)
  keys = jnp.asarray(rng.standard_normal((heads, 2, n, dk // 2)), dtype)
  return q, keys


@needs_kernel
@pytest.mark.parametrize("heads,n,dk,k,dtype", [
    (2, 64, 16, 8, np.float32), (3, 33, 8, 33, np.float32), (2, 50, 16, 1, np.float32),
    (2, 64, 16, 8, jnp.bfloat16), (1, 31, 8, 5, jnp.bfloat16)])
def test_product_key_topk_slots_equal_xla_and_brute_force(heads, n, dk, k, dtype):
  q, keys = _memory(n + k, 40, heads, n, dk, dtype)
  fn = jax.jit(product_key_topk, static_argnums=2, static_argnames="backend")
  scores, idx = fn(q, keys, k, backend="cpu")
  want_scores, want_idx = fn(q, keys, k, backend="xla")
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(_bits(scores), _bits(want_scores))
  # Brute force over all n^2 slots: the same slots in the same order (continuous scores: no ties).
  ref_scores, ref_idx = product_key_topk_reference(q, keys, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_product_key_topk_scores_match_brute_force_with_ties():
  # Integer sub-keys and queries: many equal sums. The tie order of the grid (rank in each half)
  # differs from brute force's (lower slot), so compare the sorted top-k scores, which must agree.
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.integers(-1, 2, (30, 2, 4)), jnp.float32)
  keys = jnp.asarray(rng.integers(-1, 2, (2, 2, 12, 2)), jnp.float32)
  scores, idx = product_key_topk(q, keys, 6, backend="cpu")
  np.testing.assert_array_equal(idx, product_key_topk(q, keys, 6, backend="xla")[1])
  np.testing.assert_array_equal(scores, product_key_topk_reference(q, keys, 6)[0])


@needs_kernel
@pytest.mark.parametrize("n", [32, 200])  # 32 <= 16 k: dense-score picks; 200: gathered sub-keys
def test_gradients_of_product_key_topk_are_unchanged(n):
  q, keys = _memory(0, 24, 2, n, 8)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((24, 2, 6)), jnp.float32)

  def grads(fn, **kw):
    loss = lambda q, kk: jnp.sum(w * fn(q, kk, 6, **kw)[0] ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(q, keys)

  # n 32 <= 16 k: on CPU every backend differentiates the dense scores' entries (the scatter: the
  # kernel, or XLA's under "xla"); n 200: the gathered sub-keys. Either way the backends differ only
  # in the (exact) selection, so their gradients are the same bits.
  cpu_grads = grads(product_key_topk, backend="cpu")
  for backend in ("auto", "xla"):
    for got, want in zip(grads(product_key_topk, backend=backend), cpu_grads):
      np.testing.assert_array_equal(got, want)
  # The oracle: autodiff through the brute-force top-k over all n^2 slots (fp32 summation order).
  for got, want in zip(cpu_grads, grads(product_key_topk_reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  assert float(jnp.abs(cpu_grads[1]).sum()) > 0


@needs_kernel
def test_scatter_rows_kernel_and_xla_give_the_same_bits():
  # Duplicate indices in a row are summed in order c = 0 .. k-1 by both, so the two agree exactly
  # (the top-k's dense-score gradient takes one or the other; backends must train alike).
  rng = np.random.default_rng(3)
  idx = jnp.asarray(rng.integers(0, 7, (3, 50, 40)), jnp.int32)  # ~6 hits per position
  v = jnp.asarray(rng.standard_normal((3, 50, 40)) * 10.0 ** rng.integers(-4, 4, (3, 50, 40)), jnp.float32)
  got = jax.jit(cpu.scatter_rows, static_argnums=2)(idx, v, 7)
  want = jax.jit(cpu.scatter_rows_xla, static_argnums=2)(idx, v, 7)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got[1, 2, 3], float(np.sum(np.asarray(v)[1, 2][np.asarray(idx)[1, 2] == 3])),
                             rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 1), (1, 0)])
def test_vmap(in_axes):
  rng = np.random.default_rng(5)
  shape = lambda ax: (4, 3, 20) if ax == 0 else ((3, 4, 20) if ax == 1 else (3, 20))
  s1, s2 = (rng.standard_normal(shape(ax)).astype(np.float32) for ax in in_axes)
  run = lambda backend: jax.jit(jax.vmap(
      lambda a, b: topk.product_topk_from_scores(a, b, 5, backend=backend), in_axes=in_axes))(s1, s2)
  got = run("cpu")
  assert got[0].shape == (4, 3, 5)
  _assert_same(got, run("xla"))
  _assert_same(run("auto"), got)


@needs_kernel
def test_vmap_of_product_key_topk_and_nested_vmap():
  q, keys = _memory(2, 12, 2, 16, 8)
  q = q.reshape(3, 4, 2, 8)
  fn = lambda backend: jax.vmap(lambda x: product_key_topk(x, keys, 4, backend=backend))(q)
  for got, want in zip(fn("cpu"), fn("xla")):
    np.testing.assert_array_equal(_bits(got), _bits(want))
  s = np.random.default_rng(0).standard_normal((2, 3, 4, 9)).astype(np.float32)
  nested = lambda backend: jax.vmap(jax.vmap(lambda a, b: topk.product_topk_from_scores(a, b, 3, backend=backend)))
  _assert_same(nested("cpu")(s, s[::-1]), nested("xla")(s, s[::-1]))


def _lowered(fn, platform, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@needs_kernel
def test_auto_takes_the_kernel_only_when_lowered_for_cpu():
  s = jax.ShapeDtypeStruct((8, 2, 64), jnp.float32)
  auto = lambda a, b: topk.product_topk_from_scores(a, b, 4)
  assert TARGET in _lowered(auto, "cpu", s, s)
  for platform in ("cuda", "tpu"):
    text = _lowered(auto, platform, s, s)
    assert TARGET not in text and "top_k" in text, platform
  assert TARGET not in _lowered(lambda a, b: topk.product_topk_from_scores(a, b, 4, backend="xla"), "cpu", s, s)
  # The same through product_key_topk, with a gradient.
  q, keys = jax.ShapeDtypeStruct((16, 2, 8), jnp.float32), jax.ShapeDtypeStruct((2, 2, 64, 4), jnp.float32)
  loss = jax.grad(lambda q, kk: product_key_topk(q, kk, 4)[0].sum(), argnums=(0, 1))
  assert TARGET in _lowered(loss, "cpu", q, keys)
  assert TARGET not in _lowered(loss, "tpu", q, keys)


@pytest.mark.parametrize("n,k", [(64, 8), (37, 37), (1, 1)])
def test_gather_free_formulation_equals_xla(n, k):
  """The TPU formulation (one-hot picks instead of index gathers) returns the reference's arrays;
  ``approx`` is exact where the compiler has no approximate top-k (CPU)."""
  rng = np.random.default_rng(n)
  s1, s2 = (rng.integers(-3, 4, (6, 2, n)).astype(np.float32) for _ in range(2))  # many ties
  want = topk.product_topk_xla(s1, s2, k)
  _assert_same(jax.jit(lambda a, b: topk.product_topk_gather_free(a, b, k))(s1, s2), want)
  _assert_same(topk.product_topk_gather_free(s1, s2, k), want)
  # approx: the same scores; ties may come in another order (approx_max_k is not stable on CPU).
  np.testing.assert_array_equal(topk.product_topk_from_scores(s1, s2, k, backend="approx")[0], want[0])
  u1, u2 = (rng.standard_normal((6, 2, n)).astype(np.float32) for _ in range(2))  # no ties
  _assert_same(topk.product_topk_from_scores(u1, u2, k, backend="approx"), topk.product_topk_xla(u1, u2, k))


def test_tpu_lowering_has_no_gather_and_the_same_gradients():
  """Lowered for TPU, ``auto`` holds no gather (forward and backward); the picked scores'
  gradients equal the gathered ones' (run here on CPU)."""
  q, keys = _memory(3, 20, 2, 32, 8)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((20, 2, 5)), jnp.float32)
  loss = lambda q, kk, backend="auto": jnp.sum(w * product_key_topk(q, kk, 5, backend=backend)[0] ** 2)
  grad = jax.grad(loss, argnums=(0, 1))
  text = _lowered(grad, "tpu", q, keys)
  assert "gather" not in text and "scatter" not in text
  assert "gather" in _lowered(lambda q, kk: grad(q, kk, "xla"), "tpu", q, keys)
  from memjax.memory import product_keys as pk
  _, i, j = topk.product_topk_xla(*pk.subkey_scores(q, keys), 5)
  picked = jax.grad(lambda q, kk: jnp.sum(w * pk._picked_scores(q, kk, i, j) ** 2), argnums=(0, 1))(q, keys)
  gathered = jax.grad(lambda q, kk: jnp.sum(w * pk._selected_scores(q, kk, i, j) ** 2), argnums=(0, 1))(q, keys)
  for got, want in zip(picked, gathered):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_without_the_kernel_every_backend_runs_xla(monkeypatch):
  monkeypatch.setattr(cpu, "_state", {"ok": False, "message": "disabled for this test"})
  rng = np.random.default_rng(0)
  s1, s2 = (rng.standard_normal((5, 30)).astype(np.float32) for _ in range(2))
  want = topk.product_topk_xla(s1, s2, 6)
  for backend in set(topk.BACKENDS) - {"approx"}:
    _assert_same(topk.product_topk_from_scores(s1, s2, 6, backend=backend), want)
    assert TARGET not in _lowered(lambda a, b: topk.product_topk_from_scores(a, b, 6, backend=backend), "cpu",
                                  s1, s2)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k=0"), ({"k": 11}, "k=11"), ({"k": True}, "k=True"), ({"k": 2, "backend": "gpu"}, "backend='gpu'")])
def test_bad_arguments_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    topk.product_topk_from_scores(jnp.zeros((3, 10)), jnp.zeros((3, 10)), **kwargs)


def test_halves_of_different_shapes_are_refused():
  with pytest.raises(ValueError, match="same shape"):
    topk.product_topk_from_scores(jnp.zeros((3, 10)), jnp.zeros((3, 11)), 2)
  with pytest.raises(ValueError, match="backend='cuda'"):
    product_key_topk(jnp.zeros((2, 8)), jnp.zeros((2, 2, 4, 4)), 2, backend="cuda")


@needs_kernel
def test_portable_build_equals_xla():
  # The library as built where -march=native fails (no AVX-512 paths; the compiler's own choices),
  # cached like cpu.py's builds: compiled once per source version.
  import ctypes
  cxx = cpu._compiler()
  path = cpu._library_path(cxx, cpu._BASE_FLAGS)
  if not path.exists():
    assert cpu._compile(cxx, cpu._BASE_FLAGS, path) is None
  lib = ctypes.CDLL(str(path))
  jax.ffi.register_ffi_target("memjax_product_topk_portable", jax.ffi.pycapsule(lib.MemjaxProductTopK),
                              platform="cpu")
  rng = np.random.default_rng(0)
  special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 1.0, -1.0], np.float32)
  for n, k in [(256, 32), (37, 1), (33, 33), (1000, 70), (17, 5)]:
    halves = [np.concatenate([rng.standard_normal((20, n)).astype(np.float32),  # random, ties, specials
                              rng.integers(-2, 3, (20, n)).astype(np.float32), rng.choice(special, (20, n))])
              for _ in range(2)]
    out = [jax.ShapeDtypeStruct((60, k), dtype) for dtype in (jnp.float32, jnp.int32, jnp.int32)]
    call = jax.ffi.ffi_call("memjax_product_topk_portable", out)
    _assert_same(jax.jit(lambda a, b: call(a, b, k=k))(*halves),
                 jax.jit(topk.product_topk_xla, static_argnums=2)(*halves, k))


@needs_kernel
def test_kernel_path_and_xla_path_train_alike_for_5_steps(update="sparse"):
  """model.memory.topk = "auto" (the C++ selection) against "xla" (three top_k), the bag on "xla" in
  both: the same slots and the same gradient formulation (dense-score picks, scattered by the kernel
  or by XLA: the same bits), so the same losses bit for bit, step for step."""
  from tests.helpers import random_batch, tiny_raw
  from memjax.config_bridge import config_from_dict
  from memjax.train.step import make_step_fns

  losses = {}
  for topk_method in ("auto", "xla"):
    raw = tiny_raw()
    raw.model.memory.topk, raw.model.memory.backend = topk_method, "xla"
    raw.model.memory.value_update = update
    cfg = config_from_dict(raw).with_vocab(64)
    fns = make_step_fns(cfg.model, cfg.train)
    state, step = jax.jit(fns.init)(0), jax.jit(fns.train_step)
    losses[topk_method] = []
    for s in range(5):
      state, m = step(state, random_batch(s, 8, 64, 64, repeat=True))
      losses[topk_method].append(float(m["loss"]))
  np.testing.assert_array_equal(losses["auto"], losses["xla"])
  assert losses["auto"][-1] < losses["auto"][0]  # it trains
