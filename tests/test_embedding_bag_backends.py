"""Every embedding_bag backend against the xla reference: forward, both gradients, row gradients.

Pallas kernels run in interpret mode (``pallas_*_interpret``) on tiny grids; interpret mode fills
outputs with NaN before the kernel runs, so a parity test also proves every output element is
written. GPU and TPU kernels are lowered for ``cuda``/``tpu`` from CPU at realistic shapes.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import cpu, pallas_gpu, pallas_tpu
from memjax.kernels.embedding_bag import (AUTO_ORDER, BACKENDS, embedding_bag, embedding_bag_row_grads,
                                          resolve_backend)

# backend -> (block sizes, value_dim) small enough for interpret mode, with more than one block.
CASES = {
    "xla_loop": (None, 24),
    "cpu": (None, 24),
    "pallas_gpu_interpret": (pallas_gpu.BlockSizes(block_l=4, block_d=8, block_n=4), 16),
    "pallas_tpu_interpret": (pallas_tpu.BlockSizes(block_d=128, rows_per_step=8, lookups_per_call=16), 256),
}


def _inputs(seed, m, d, b, bag, dtype=np.float32):
  rng = np.random.default_rng(seed)
  values = rng.standard_normal((m, d)).astype(dtype)
  idx = rng.integers(0, m, size=(b, bag)).astype(np.int32)
  idx[:, 1] = idx[:, 0]        # duplicates inside a bag
  idx[-1] = idx[0, 0]          # a bag that reads one row only, shared with bag 0
  w = rng.standard_normal((b, bag)).astype(np.float32)
  dout = rng.standard_normal((b, d)).astype(np.float32)
  return values, idx, w, dout


def _run(backend, block_sizes, values, idx, w, dout):
  @jax.jit
  def f(values, w):
    out, vjp = jax.vjp(lambda v, ww: embedding_bag(v, idx, ww, backend=backend, block_sizes=block_sizes),
                       values, w)
    return out, *vjp(dout.astype(out.dtype))
  return f(values, w)


@pytest.mark.parametrize("backend", sorted(CASES))
def test_forward_and_gradients_equal_xla(backend):
  block_sizes, d = CASES[backend]
  values, idx, w, dout = _inputs(sorted(CASES).index(backend), m=13, d=d, b=3, bag=8)
  got = _run(backend, block_sizes, values, idx, w, dout)
  want = _run("xla", None, values, idx, w, dout)
  for name, g, r in zip(("out", "d_values", "d_weights"), got, want):
    assert not np.isnan(np.asarray(g)).any(), f"{backend} left {name} elements unwritten"
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"{backend}: {name}")


@pytest.mark.parametrize("backend", sorted(CASES))
def test_row_grads_equal_xla(backend):
  block_sizes, d = CASES[backend]
  values, idx, w, dout = _inputs(7, m=29, d=d, b=3, bag=8)
  fn = jax.jit(embedding_bag_row_grads, static_argnames=("num_slots", "backend", "block_sizes"))
  rows, grads = fn(idx, w, dout, num_slots=29, backend=backend, block_sizes=block_sizes)
  want_rows, want_grads = fn(idx, w, dout, num_slots=29, backend="xla")
  np.testing.assert_array_equal(rows, want_rows)  # distinct rows ascending, then num_slots
  np.testing.assert_allclose(grads, want_grads, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(grads)[np.asarray(rows) == 29] == 0.0)


def test_interpret_mode_poisons_unwritten_outputs():
  """The premise of the parity tests: an output element a kernel never writes comes back NaN."""
  from jax.experimental import pallas as pl

  def writes_first_half(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  out = pl.pallas_call(writes_first_half, grid=(2,), in_specs=[pl.BlockSpec((4,), lambda i: (i,))],
                       out_specs=pl.BlockSpec((4,), lambda i: (i,)),
                       out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)(jnp.ones(8))
  np.testing.assert_array_equal(out[:4], 1.0)
  assert np.isnan(np.asarray(out[4:])).all()


@pytest.mark.parametrize("backend", ["cpu", "pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_bf16_values_accumulate_in_fp32(backend):
  block_sizes, d = CASES[backend]
  values, idx, w, dout = _inputs(3, m=11, d=d, b=2, bag=8)
  values = jnp.asarray(values, jnp.bfloat16)
  out, dv, dw = _run(backend, block_sizes, values, idx, w, dout)
  want = _run("xla", None, values, idx, w, dout)
  assert out.dtype == jnp.float32 and dv.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  for g, r in zip((out, dv, dw), want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-2)


# ----- the streaming TPU kernels: chunking, padding, runs across chunks, bf16 word rows ---------------

# Segment chunks of 24 sorted lookups (3 steps of 8) and forward chunks of one bag step: with 5 bags of
# 12 (padded to 8 bags of 16), the segment sum gets 3 chunks, the last one short.
_TPU_ODD = pallas_tpu.BlockSizes(block_d=128, bags_per_step=8, rows_per_step=8, lookups_per_call=24)


def _few_rows_inputs(seed, m, d, b, bag, dtype):
  """Many duplicates: a handful of rows, one of them read by more lookups than a chunk holds."""
  values, _, w, dout = _inputs(seed, m=m, d=d, b=b, bag=bag, dtype=dtype)
  rng = np.random.default_rng(seed)
  idx = rng.choice(np.array([0, 1, m - 2, m - 1]), size=(b, bag)).astype(np.int32)
  idx[:3] = m - 1  # 36 lookups of the last row: one run longer than a chunk
  return values, idx, w, dout


@pytest.mark.parametrize("m", [12, 13])  # even and odd tables (odd bf16: the last row has no word row)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_tpu_kernels_chunked_padded_and_duplicated(m, dtype):
  values, idx, w, dout = _few_rows_inputs(m, m=m, d=256, b=5, bag=12, dtype=np.float32)
  values = jnp.asarray(values, dtype)
  got = _run("pallas_tpu_interpret", _TPU_ODD, values, idx, w, dout)
  want = _run("xla", None, values, idx, w, dout)
  tol = 1e-5 if dtype == np.float32 else 8e-3  # bf16 d_values: one rounding of the fp32 sum
  for name, g, r in zip(("out", "d_values", "d_weights"), got, want):
    assert not np.isnan(np.asarray(g, np.float32)).any(), f"{name} has unwritten elements"
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol,
                               err_msg=name)


def test_tpu_forward_and_weight_grad_in_several_bag_chunks():
  """20 bags (padded to 24) in calls of 8 bags: outputs written in place, d_out blocks offset."""
  values, idx, w, dout = _inputs(21, m=50, d=256, b=20, bag=8)
  got = _run("pallas_tpu_interpret", _TPU_ODD, values, idx, w, dout)
  want = _run("xla", None, values, idx, w, dout)
  for name, g, r in zip(("out", "d_values", "d_weights"), got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("bag", [12, 16])
def test_tpu_row_grads_runs_across_chunks(bag):
  _, idx, w, dout = _few_rows_inputs(bag, m=29, d=256, b=5, bag=bag, dtype=np.float32)
  fn = jax.jit(embedding_bag_row_grads, static_argnames=("num_slots", "backend", "block_sizes"))
  rows, grads = fn(idx, w, dout, num_slots=29, backend="pallas_tpu_interpret", block_sizes=_TPU_ODD)
  want_rows, want_grads = fn(idx, w, dout, num_slots=29, backend="xla")
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_allclose(grads, want_grads, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(grads)[np.asarray(rows) == 29] == 0.0)


def test_tpu_bf16_dense_gradient_writes_both_rows_of_a_word():
  """Rows 2i and 2i + 1 share a word row of a bf16 table: sums into either, both, or neither."""
  m, d = 10, 128
  values = jnp.asarray(np.random.default_rng(0).standard_normal((m, d)), jnp.bfloat16)
  idx = np.array([[2, 3, 3, 4], [9, 9, 6, 2], [3, 4, 7, 6]], np.int32)  # word rows 1, 2, 3, 4: all cases
  w = np.arange(1, 13, dtype=np.float32).reshape(3, 4) / 7
  dout = np.random.default_rng(1).standard_normal((3, d)).astype(np.float32)
  bs = pallas_tpu.BlockSizes(block_d=128, rows_per_step=8, lookups_per_call=8)
  _, dv, _ = _run("pallas_tpu_interpret", bs, values, idx, w, dout)
  _, want, _ = _run("xla", None, values, idx, w, dout)
  np.testing.assert_allclose(np.asarray(dv, np.float32), np.asarray(want, np.float32), rtol=8e-3, atol=1e-6)
  untouched = np.setdiff1d(np.arange(m), idx)
  assert np.all(np.asarray(dv, np.float32)[untouched] == 0.0)


def test_tpu_roofline_counts_bytes():
  r = pallas_tpu.roofline_seconds("forward", num_slots=2**20, value_dim=1024, bags=8192, bag_size=128,
                                  value_dtype=jnp.bfloat16, chip="v5p")
  n = 8192 * 128
  assert r["compulsory_bytes"] == n * 1024 * 2 + 8192 * 1024 * 4 + n * 8
  assert r["moved_bytes"] == n * 1024 * 4 + 8192 * 1024 * 4 + n * 8  # bf16 rows move as word rows
  assert r["roofline_seconds"] == pytest.approx(r["moved_bytes"] / 2765e9)


@pytest.mark.parametrize("d", [8, 16, 300])  # a tail of < 16 columns only; one vector; 256 + 32 + 12
def test_cpu_kernel_column_blocking(d):
  values, idx, w, dout = _inputs(d, m=50, d=d, b=5, bag=7)
  for got, want in zip(_run("cpu", None, values, idx, w, dout), _run("xla", None, values, idx, w, dout)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_value_gradient_is_deterministic():
  values, idx, w, dout = _inputs(11, m=17, d=40, b=64, bag=16)  # many duplicates per row
  first = _run("cpu", None, values, idx, w, dout)
  for _ in range(3):
    for a, b in zip(first, _run("cpu", None, values, idx, w, dout)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "pallas_gpu_interpret"])
def test_vmap_over_bags_and_grad(backend):
  block_sizes, d = CASES[backend]
  values, idx, w, _ = _inputs(5, m=13, d=d, b=3, bag=8)
  idx3, w3 = np.stack([idx, idx[::-1]]), np.stack([w, -w])

  def loss(v, name, bs):
    bag = jax.vmap(lambda i, ww: embedding_bag(v, i, ww, backend=name, block_sizes=bs))
    return (bag(idx3, w3) ** 2).sum()

  got = jax.value_and_grad(loss)(values, backend, block_sizes)
  want = jax.value_and_grad(loss)(values, "xla", None)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


# ----- lowering for GPU and TPU from CPU, at realistic shapes ----------------------------------------

M, DV, B, L = 4096, 1024, 8, 128


def _lower(backend, platform, dtype):
  v = jax.ShapeDtypeStruct((M, DV), dtype)
  i = jax.ShapeDtypeStruct((B, L), jnp.int32)
  w = jax.ShapeDtypeStruct((B, L), jnp.float32)
  g = jax.ShapeDtypeStruct((B, DV), jnp.float32)

  def fwd_bwd(v, i, w, g):
    out, vjp = jax.vjp(lambda v, w: embedding_bag(v, i, w, backend=backend), v, w)
    return out, vjp(g.astype(out.dtype))

  full = jax.jit(fwd_bwd).trace(v, i, w, g).lower(lowering_platforms=(platform,)).as_text()
  rows = jax.jit(lambda i, w, g: embedding_bag_row_grads(i, w, g, M, backend=backend)).trace(
      i, w, g).lower(lowering_platforms=(platform,)).as_text()
  return full, rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_lowers_to_triton_for_cuda(dtype):
  full, rows = _lower("pallas_gpu", "cuda", dtype)
  # forward, weight gradient and value-gradient segment sum; row gradients: the segment sum.
  assert full.count("__gpu$xla.gpu.triton") == 3
  assert rows.count("__gpu$xla.gpu.triton") == 1
  for name in ("memjax_bag_forward", "memjax_bag_weight_grad", "memjax_bag_segment_sum"):
    assert name in full


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_tpu_lowers_to_mosaic_for_tpu(dtype):
  full, rows = _lower("pallas_tpu", "tpu", dtype)
  assert full.count("tpu_custom_call") == 3
  assert rows.count("tpu_custom_call") == 1
  for name in ("memjax_bag_forward", "memjax_bag_weight_grad", "memjax_bag_segment_sum"):
    assert name in full


# ----- backends, block sizes and errors ---------------------------------------------------------------


def test_auto_order_and_registry():
  assert resolve_backend("auto") == AUTO_ORDER[jax.default_backend()][0]
  assert AUTO_ORDER["gpu"][0] == "pallas_gpu" and AUTO_ORDER["tpu"][0] == "pallas_tpu"
  for name in ("xla", "xla_loop", "cpu", "pallas_gpu", "pallas_tpu", "pallas_gpu_interpret",
               "pallas_tpu_interpret"):
    assert name in BACKENDS


def test_auto_falls_back_to_xla_for_dtypes_kernels_reject():
  values, idx, w, _ = _inputs(0, m=5, d=8, b=2, bag=4)
  out = embedding_bag(values.astype(np.float16), idx, w.astype(np.float16))  # cpu kernel: f32/bf16 only
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(embedding_bag(values, idx, w, backend="xla")), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend,block_sizes,shape,dtype,match", [
    ("pallas_gpu", pallas_gpu.BlockSizes(block_d=64), (16, 96, 8), np.float32,
     r"value_dim=96 must be a multiple of block_d=64"),
    ("pallas_gpu", pallas_gpu.BlockSizes(block_l=16, block_d=64), (16, 64, 8), np.float32,
     r"bag_size=8 must be a multiple of block_l=16"),
    ("pallas_tpu", pallas_tpu.BlockSizes(block_d=256), (16, 384, 8), np.float32,
     r"value_dim=384 must be a multiple of block_d=256"),
    ("pallas_tpu", None, (16, 100, 8), np.float32, r"value_dim=100 must be a multiple of 128"),
    ("pallas_tpu", None, (16, 128, 8), np.float16, r"values.dtype=dtype\('float16'\)"),
    ("cpu", None, (16, 64, 8), np.float16, r"values.dtype=dtype\('float16'\)"),
    ("cpu", pallas_gpu.BlockSizes(), (16, 64, 8), np.float32, r"takes no block sizes"),
    ("pallas_gpu", pallas_tpu.BlockSizes(), (16, 128, 8), np.float32, r"takes pallas_gpu.BlockSizes"),
])
def test_unsupported_shapes_and_dtypes_name_the_values(backend, block_sizes, shape, dtype, match):
  m, d, bag = shape
  values = jax.ShapeDtypeStruct((m, d), dtype)
  idx = jax.ShapeDtypeStruct((4, bag), jnp.int32)
  w = jax.ShapeDtypeStruct((4, bag), jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda v, i, ww: embedding_bag(v, i, ww, backend=backend, block_sizes=block_sizes),
                   values, idx, w)


@pytest.mark.parametrize("make,match", [
    (lambda: pallas_gpu.BlockSizes(block_d=96), r"block_d=96 must be a positive power of two"),
    (lambda: pallas_gpu.BlockSizes(num_stages=0), r"num_stages=0"),
    (lambda: pallas_tpu.BlockSizes(block_d=100), r"block_d=100 must be a positive multiple of 128"),
    (lambda: pallas_tpu.BlockSizes(rows_per_step=24, lookups_per_call=16), r"lookups_per_call=16 must be a multiple"),
    (lambda: pallas_tpu.BlockSizes(rows_per_step=12), r"rows_per_step=12 must be a positive multiple of 8"),
    (lambda: pallas_tpu.BlockSizes(bags_per_step=4), r"bags_per_step=4 must be a positive multiple of 8"),
])
def test_block_sizes_validate(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_block_sizes_are_frozen_and_fit_the_shape():
  bs = pallas_gpu.BlockSizes.for_shape(bag_size=24, value_dim=96)
  assert (bs.block_l, bs.block_d) == (8, 32)
  with pytest.raises(AttributeError):
    bs.block_l = 4  # frozen
  tpu = pallas_tpu.BlockSizes.for_shape(bag_size=12, value_dim=384)
  assert (tpu.block_d, tpu.bags_per_step) == (384, 8)
  # A step copies bags_per_step * L rows of block_d columns: as wide as 2048 while a slot fits 8 MiB.
  assert pallas_tpu.BlockSizes.for_shape(bag_size=128, value_dim=1024).block_d == 1024
  assert pallas_tpu.BlockSizes.for_shape(bag_size=128, value_dim=4096).block_d == 2048
  assert pallas_tpu.BlockSizes.for_shape(bag_size=256, value_dim=4096).block_d == 1024
  assert pallas_tpu.BlockSizes.for_shape(bag_size=512, value_dim=4096).block_d == 512


def test_cpu_falls_back_to_xla_with_a_clear_message(monkeypatch):
  saved = dict(cpu._state)
  monkeypatch.setattr(cpu, "_compiler", lambda: None)
  cpu._state.clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      ok, message = cpu.ffi_status()
    assert not ok and "no C++ compiler" in message
    assert any("C++17 compiler" in str(c.message) for c in caught)
    values, idx, w, dout = _inputs(2, m=9, d=8, b=2, bag=4)
    for got, want in zip(_run("cpu", None, values, idx, w, dout), _run("xla", None, values, idx, w, dout)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  finally:
    cpu._state.clear()
    cpu._state.update(saved)


# ----- "auto" follows the platform the computation is lowered for --------------------------------------

_CPU_FFI = ("memjax_bag_forward", "memjax_bag_weight_grad", "memjax_bag_value_grad", "memjax_bag_row_grads")


def _lowered(fn, platform, *args):
  """The custom-call targets of ``fn`` lowered for ``platform`` (Pallas kernels share our FFI names as
  kernel names, so match call targets, not text)."""
  import re
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return set(re.findall(r'custom_call @?"?([\w$.]+)', text))


def test_auto_takes_the_kernel_of_the_lowering_platform_not_the_host():
  values = jax.ShapeDtypeStruct((4096, 128), jnp.float32)
  idx = jax.ShapeDtypeStruct((64, 16), jnp.int32)
  w = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  fwd_bwd = lambda v, i, ww: jax.grad(lambda v, ww: embedding_bag(v, i, ww).sum(), argnums=(0, 1))(v, ww)
  cpu_text, tpu_text, cuda_text = (_lowered(fwd_bwd, p, values, idx, w) for p in ("cpu", "tpu", "cuda"))
  assert {"memjax_bag_weight_grad", "memjax_bag_value_grad"} <= cpu_text  # the C++ kernels on CPU
  assert tpu_text == {"tpu_custom_call"}  # Mosaic on TPU
  assert cuda_text == {"__gpu$xla.gpu.triton"}  # Triton on GPU
  rows = lambda i, ww, d: embedding_bag_row_grads(i, ww, d, 4096)
  dout = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  assert "memjax_bag_row_grads" in _lowered(rows, "cpu", idx, w, dout)
  assert "memjax_bag_row_grads" not in _lowered(rows, "tpu", idx, w, dout)


def test_auto_falls_back_per_platform_when_a_kernel_refuses_the_shape():
  # 64 columns: pallas_tpu needs multiples of 128, so TPU gets XLA while CPU keeps its kernel.
  values = jax.ShapeDtypeStruct((4096, 64), jnp.float32)
  idx = jax.ShapeDtypeStruct((64, 16), jnp.int32)
  w = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  bag = lambda v, i, ww: embedding_bag(v, i, ww)
  assert "tpu_custom_call" not in _lowered(bag, "tpu", values, idx, w)
  assert "memjax_bag_forward" in _lowered(bag, "cpu", values, idx, w)


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_train_step_lowered_for_accelerators_holds_no_cpu_kernel(update):
  from configs import tiny
  from memjax.config_bridge import config_from_dict
  from memjax.train.step import make_step_fns
  c = tiny.get_config()
  c.model.memory.value_update = update
  cfg = config_from_dict(c).with_vocab(259)
  fns = make_step_fns(cfg.model, cfg.train)
  state = jax.eval_shape(fns.init, 0)
  batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  for platform in ("tpu", "cuda"):
    text = _lowered(fns.train_step, platform, state, batch)
    assert not any(t in text for t in _CPU_FFI + ("memjax_product_topk",)), platform
  assert "memjax_product_topk" in _lowered(fns.train_step, "cpu", state, batch)
