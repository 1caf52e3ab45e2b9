"""The ``pallas_gpu`` backend: embedding-bag kernels in Pallas with the Triton lowering.

Shapes (flattened bags): values [M, Dv], idx [B, L] int32, w [B, L], d_out [B, Dv], N = B * L.

Kernels (all accumulate in fp32; each program owns one output block, so no atomics anywhere):
  forward        grid (B, Dv / block_d): one bag, one column block. Loops over the bag in chunks of
                 block_l lookups, gathering a [block_l, block_d] tile of rows per step.
  weight grad    grid (B, L / block_l): block_l lookups of one bag; loops over Dv in block_d
                 columns, dw[b, l] += sum(values[idx[b, l], cols] * d_out[b, cols]).
  segment sum    grid (S, Dv / block_d): sums w[n] * d_out[n // L] over the sorted lookups
                 offsets[s] .. offsets[s + 1] in chunks of block_n (the "reverse indices" backward).
                 Dense d_values: S = M, offsets = CSR row offsets, untouched rows get zeros.
                 Row-sparse gradients: S = N, offsets = run starts (``xla.py``).
The sort of the lookups by row (``xla.py``) is a stable XLA argsort.

Compiled deviceless for sm_90 (benchmarks/kernel_compile.py, H100/H200 specs in memjax/scale/targets)
the default tiles need 0.5-2 KiB of shared memory per launch (of 227 KiB), ptxas reports <= 128 registers and no spills
at values 2^20 x {1024, 2048, 4096}, bags of 128 and 256. A deviceless compile of ``backward`` or
``row_grads`` with more than ~22k lookups fails with "cudaErrorInvalidDevice: invalid device
ordinal": XLA's GPU SortRewriter turns the argsort of segments.sort_lookups into a CUB radix sort
(on Hopper for 32-bit keys above 22,000 elements) and asks CUB, through the CUDA runtime, for its
scratch size at compile time. Compile such programs with
``compiler_options={"xla_gpu_enable_cub_radix_sort": False}`` (or that flag in XLA_FLAGS) when no GPU
is present; on a GPU, keep the CUB sort.

``interpret=True`` runs the same kernels in Pallas interpret mode (any platform; tests on CPU).
The Triton backend is chosen by passing ``jax.experimental.pallas.triton.CompilerParams``, which the
lowering turns into a ``__gpu$xla.gpu.triton`` custom call (no jax-triton needed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memjax.kernels import xla

SUPPORTED_VALUE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _largest_pow2_divisor(n: int, cap: int) -> int:
  b = 1
  while b * 2 <= cap and n % (b * 2) == 0:
    b *= 2
  return b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the Triton kernels. Triton needs power-of-two tiles.

  block_l: lookups gathered per step (forward, weight gradient); must divide the bag size L.
  block_d: value columns per program; must divide value_dim.
  block_n: sorted lookups gathered per step of the value-gradient segment sum.
  num_warps, num_stages: Triton launch parameters.
  """

  block_l: int = 32
  block_d: int = 256
  block_n: int = 32
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_l", "block_d", "block_n", "num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_pow2(value):
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive power of two")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages!r} must be a positive int")

  @classmethod
  def for_shape(cls, bag_size: int, value_dim: int) -> "BlockSizes":
    """The defaults, shrunk to the largest powers of two that divide the shape."""
    d = cls()
    return cls(block_l=_largest_pow2_divisor(bag_size, d.block_l),
               block_d=_largest_pow2_divisor(value_dim, d.block_d), block_n=d.block_n,
               num_warps=d.num_warps, num_stages=d.num_stages)


def _resolve(block_sizes, bag_size: int, value_dim: int) -> BlockSizes:
  if block_sizes is None:
    return BlockSizes.for_shape(bag_size, value_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"backend 'pallas_gpu' takes pallas_gpu.BlockSizes, got {block_sizes=}")
  block_l, block_d = block_sizes.block_l, block_sizes.block_d
  if value_dim % block_d:
    raise ValueError(f"{value_dim=} must be a multiple of {block_d=}")
  if bag_size % block_l:
    raise ValueError(f"{bag_size=} must be a multiple of {block_l=}")
  return block_sizes


def check(values, idx_BxL, w_BxL, block_sizes=None) -> None:
  """Raises ValueError naming the shape or dtype the Triton kernels cannot take."""
  del w_BxL
  if values.dtype not in SUPPORTED_VALUE_DTYPES:
    raise ValueError(f"backend 'pallas_gpu' supports values.dtype in (float32, bfloat16, float16), "
                     f"got {values.dtype=}")
  _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])


def _params(bs: BlockSizes):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


_ANY = pl.BlockSpec(memory_space=pl.ANY)


# ----- kernels --------------------------------------------------------------------------------------


def _forward_kernel(idx_ref, w_ref, values_ref, out_ref, *, bag, block_l, block_d, num_slots):
  # idx_ref, w_ref [B, L]; values_ref [M, Dv]; out_ref [block_d] of bag b.
  b, d = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(pl.multiple_of(d * block_d, block_d), block_d)

  def step(j, acc_D):
    lookups = pl.ds(pl.multiple_of(j * block_l, block_l), block_l)
    idx_l = jnp.clip(idx_ref[b, lookups], 0, num_slots - 1)              # [block_l]
    w_l = w_ref[b, lookups].astype(jnp.float32)                          # [block_l]
    rows_lxd = values_ref[idx_l, cols].astype(jnp.float32)               # [block_l, block_d]
    return acc_D + jnp.sum(w_l[:, None] * rows_lxd, axis=0)

  acc_D = lax.fori_loop(0, bag // block_l, step, jnp.zeros((block_d,), jnp.float32))
  out_ref[...] = acc_D.astype(out_ref.dtype)


def _weight_grad_kernel(idx_ref, values_ref, dout_ref, dw_ref, *, value_dim, block_l, block_d, num_slots):
  # dw_ref [block_l]: lookups j * block_l ... of bag b.
  b, j = pl.program_id(0), pl.program_id(1)
  lookups = pl.ds(pl.multiple_of(j * block_l, block_l), block_l)
  idx_l = jnp.clip(idx_ref[b, lookups], 0, num_slots - 1)

  def step(k, acc_l):
    cols = pl.ds(pl.multiple_of(k * block_d, block_d), block_d)
    rows_lxd = values_ref[idx_l, cols].astype(jnp.float32)
    g_d = dout_ref[b, cols].astype(jnp.float32)
    return acc_l + jnp.sum(rows_lxd * g_d[None, :], axis=1)

  dw_ref[...] = lax.fori_loop(0, value_dim // block_d, step, jnp.zeros((block_l,), jnp.float32))


def _segment_sum_kernel(off_ref, order_ref, w_ref, dout_ref, out_ref, *, bag, block_n, block_d):
  # out_ref [block_d] of segment s = sum over sorted positions off[s] .. off[s + 1].
  s, d = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(pl.multiple_of(d * block_d, block_d), block_d)
  start, end = off_ref[s], off_ref[s + 1]

  def step(k, acc_D):
    pos_n = start + k * block_n + lax.broadcasted_iota(jnp.int32, (block_n,), 0)
    valid_n = pos_n < end
    lookup_n = order_ref[jnp.where(valid_n, pos_n, 0)]                   # [block_n] lookup ids
    w_n = jnp.where(valid_n, w_ref[lookup_n], 0.0)
    rows_nxd = dout_ref[lookup_n // bag, cols].astype(jnp.float32)      # [block_n, block_d]
    return acc_D + jnp.sum(w_n[:, None] * rows_nxd, axis=0)

  steps = (end - start + block_n - 1) // block_n
  out_ref[...] = lax.fori_loop(0, steps, step, jnp.zeros((block_d,), jnp.float32)).astype(out_ref.dtype)


# ----- calls ------------------------------------------------------------------------------------------


def _forward_call(values, idx_BxL, w_BxL, bs: BlockSizes, interpret: bool):
  (m, d), (b, bag) = values.shape, idx_BxL.shape
  kernel = functools.partial(_forward_kernel, bag=bag, block_l=bs.block_l, block_d=bs.block_d,
                                 num_slots=m)
  return pl.pallas_call(
      kernel, grid=(b, d // bs.block_d), in_specs=[_ANY, _ANY, _ANY],
      out_specs=pl.BlockSpec((None, bs.block_d), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((b, d), jnp.float32),
      compiler_params=_params(bs), interpret=interpret, name="memjax_bag_forward",
  )(idx_BxL, w_BxL.astype(jnp.float32), values)


def _weight_grad_call(values, idx_BxL, dout_BxD, bs: BlockSizes, interpret: bool):
  (m, d), (b, bag) = values.shape, idx_BxL.shape
  kernel = functools.partial(_weight_grad_kernel, value_dim=d, block_l=bs.block_l,
                                 block_d=bs.block_d, num_slots=m)
  return pl.pallas_call(
      kernel, grid=(b, bag // bs.block_l), in_specs=[_ANY, _ANY, _ANY],
      out_specs=pl.BlockSpec((None, bs.block_l), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((b, bag), jnp.float32),
      compiler_params=_params(bs), interpret=interpret, name="memjax_bag_weight_grad",
  )(idx_BxL, values, dout_BxD.astype(jnp.float32))


def _segment_sum_call(offsets_S1, order_N, w_N, dout_BxD, bag, out_dtype, bs: BlockSizes, interpret: bool):
  s, d = offsets_S1.shape[0] - 1, dout_BxD.shape[1]
  kernel = functools.partial(_segment_sum_kernel, bag=bag, block_n=bs.block_n, block_d=bs.block_d)
  return pl.pallas_call(
      kernel, grid=(s, d // bs.block_d), in_specs=[_ANY, _ANY, _ANY, _ANY],
      out_specs=pl.BlockSpec((None, bs.block_d), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((s, d), out_dtype),
      compiler_params=_params(bs), interpret=interpret, name="memjax_bag_segment_sum",
  )(offsets_S1, order_N, w_N.astype(jnp.float32), dout_BxD.astype(jnp.float32))


# ----- the backend ------------------------------------------------------------------------------------


def forward(values, idx_BxL, w_BxL, *, block_sizes=None, interpret=False):
  bs = _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])
  return _forward_call(values, idx_BxL, w_BxL, bs, interpret)


def backward(values, idx_BxL, w_BxL, dout_BxD, *, block_sizes=None, interpret=False):
  bs = _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])
  m, bag = values.shape[0], idx_BxL.shape[1]
  dw = _weight_grad_call(values, idx_BxL, dout_BxD, bs, interpret)
  order_N, rows_N = xla.sort_lookups(jnp.clip(idx_BxL.reshape(-1), 0, m - 1))
  offsets = xla.row_offsets(rows_N, m)
  dv = _segment_sum_call(offsets, order_N, w_BxL.reshape(-1), dout_BxD, bag, values.dtype, bs, interpret)
  return dv, dw


def row_grads(idx_BxL, w_BxL, dout_BxD, num_slots, *, block_sizes=None, interpret=False):
  bs = _resolve(block_sizes, idx_BxL.shape[1], dout_BxD.shape[1])
  order_N, rows_N = xla.sort_lookups(idx_BxL.reshape(-1))
  _, run_off_U1, run_rows_U = xla.run_layout(rows_N, num_slots)
  grads = _segment_sum_call(run_off_U1, order_N, w_BxL.reshape(-1), dout_BxD, idx_BxL.shape[1],
                            jnp.float32, bs, interpret)
  return run_rows_U, grads
