"""The ``pallas_tpu`` backend: embedding-bag kernels in Pallas/Mosaic, indices by scalar prefetch.

Shapes (flattened bags): values [M, Dv], idx [B, L] int32, w [B, L], d_out [B, Dv], N = B * L,
K = rows_per_step. Arrays are viewed as [rows, 1, Dv] so that a block of one row, (1, block_d),
meets Mosaic's tiling rule (the last two block dims equal the array's or are (8k, 128k)).

The indices (and weights) are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``) and drive
the ``BlockSpec`` index maps: the table is passed K times, operand j's index map returns the row of
lookup ``l * K + j``, so every grid step DMAs K gathered rows into VMEM, double-buffered by the
Pallas pipeline, while the previous step computes.

Kernels (fp32 accumulation; no atomics):
  forward        grid (B, Dv / block_d, L / K): the output block of bag b stays in VMEM across the
                 bag axis, accumulating in an fp32 scratch.
  weight grad    grid (B, L / K, Dv / block_d): dw[b] (one [1, L] block) stays resident; each step
                 adds K partial dots <values[row], d_out[b]> over one column block.
  segment scan   grid (Dv / block_d, N / K) over the lookups sorted by row (``xla.py``): operand j
                 gathers d_out[bag of sorted lookup n K + j]; a running sum that restarts at each
                 new row is written for every sorted lookup; the last entry of each run is that row's
                 gradient. Dense d_values scatter those unique rows into zeros (XLA).
Scalar-prefetched arrays live in SMEM, which is small: calls are split into chunks of at most
``lookups_per_call`` lookups (the scan carries its running sum across chunks).

``interpret=True`` runs the kernels in Pallas interpret mode (any platform; tests on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import xla

SUPPORTED_VALUE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANES = 128


def _largest_divisor(n: int, cap: int, step: int = 1) -> int:
  """The largest multiple of ``step`` that is <= cap and divides n (0 if none)."""
  for b in range(cap - cap % step, 0, -step):
    if n % b == 0:
      return b
  return 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the Mosaic kernels.

  block_d: value columns per grid step; a multiple of 128 dividing value_dim.
  rows_per_step: K, rows gathered per grid step (the table is passed K times); must divide L.
  lookups_per_call: the most lookups scalar-prefetched into SMEM by one kernel call.
  """

  block_d: int = 512
  rows_per_step: int = 8
  lookups_per_call: int = 16384

  def __post_init__(self):
    if not isinstance(self.block_d, int) or self.block_d <= 0 or self.block_d % _LANES:
      raise ValueError(f"BlockSizes.block_d={self.block_d!r} must be a positive multiple of {_LANES}")
    for name in ("rows_per_step", "lookups_per_call"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"BlockSizes.{name}={getattr(self, name)!r} must be a positive int")
    if self.lookups_per_call % self.rows_per_step:
      raise ValueError(f"BlockSizes.lookups_per_call={self.lookups_per_call} must be a multiple of "
                       f"rows_per_step={self.rows_per_step}")

  @classmethod
  def for_shape(cls, bag_size: int, value_dim: int) -> "BlockSizes":
    """The defaults, shrunk to divisors of the shape (value_dim must be a multiple of 128)."""
    d = cls()
    if value_dim % _LANES:
      raise ValueError(f"{value_dim=} must be a multiple of {_LANES} for backend 'pallas_tpu'")
    k = _largest_divisor(bag_size, d.rows_per_step)
    return cls(block_d=_largest_divisor(value_dim, d.block_d, _LANES), rows_per_step=k,
               lookups_per_call=d.lookups_per_call - d.lookups_per_call % k)


def _resolve(block_sizes, bag_size: int, value_dim: int) -> BlockSizes:
  if block_sizes is None:
    return BlockSizes.for_shape(bag_size, value_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"backend 'pallas_tpu' takes pallas_tpu.BlockSizes, got {block_sizes=}")
  block_d, rows_per_step = block_sizes.block_d, block_sizes.rows_per_step
  if value_dim % block_d:
    raise ValueError(f"{value_dim=} must be a multiple of {block_d=}")
  if bag_size % rows_per_step:
    raise ValueError(f"{bag_size=} must be a multiple of {rows_per_step=}")
  return block_sizes


def check(values, idx_BxL, w_BxL, block_sizes=None) -> None:
  """Raises ValueError naming the shape or dtype the Mosaic kernels cannot take."""
  del w_BxL
  if values.dtype not in SUPPORTED_VALUE_DTYPES:
    raise ValueError(f"backend 'pallas_tpu' supports values.dtype in (float32, bfloat16), got {values.dtype=}")
  _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])


def _rows(x_RxD):
  return x_RxD.reshape(x_RxD.shape[0], 1, x_RxD.shape[1])


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


# ----- kernels ----------------------------------------------------------------------------------------


def _forward_kernel(idx_ref, w_ref, *refs, bag, k, num_slots):
  # idx_ref, w_ref: SMEM [chunk lookups]; refs: K row blocks [1, block_d], out [1, block_d], acc.
  del idx_ref, num_slots
  row_refs, out_ref, acc_ref = refs[:k], refs[k], refs[k + 1]
  b, l = pl.program_id(0), pl.program_id(2)

  @pl.when(l == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc = acc_ref[...]
  for j in range(k):
    acc += w_ref[b * bag + l * k + j] * row_refs[j][...].astype(jnp.float32)
  acc_ref[...] = acc

  @pl.when(l == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _weight_grad_kernel(idx_ref, *refs, bag, k):
  # refs: K row blocks [1, block_d], d_out block [1, block_d], dw block [1, L] (resident for bag b).
  del idx_ref
  row_refs, g_ref, dw_ref = refs[:k], refs[k], refs[k + 1]
  l, c = pl.program_id(1), pl.program_id(2)

  @pl.when((l == 0) & (c == 0))
  def _():
    dw_ref[...] = jnp.zeros_like(dw_ref)

  g = g_ref[...].astype(jnp.float32)
  lane = lax.broadcasted_iota(jnp.int32, (1, bag), 1)
  dw = dw_ref[...]
  for j in range(k):
    dot = jnp.sum(row_refs[j][...].astype(jnp.float32) * g, axis=1, keepdims=True)  # [1, 1]
    dw += jnp.where(lane == l * k + j, dot, 0.0)
  dw_ref[...] = dw


def _segment_scan_kernel(bag_ref, w_ref, start_ref, *refs, k):
  # refs: K d_out blocks [1, block_d], carry_in [1, block_d], out [K, 1, block_d], carry scratch.
  del bag_ref
  g_refs, carry_in_ref, out_ref, carry_ref = refs[:k], refs[k], refs[k + 1], refs[k + 2]
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    carry_ref[...] = carry_in_ref[...]

  carry = carry_ref[...]
  for j in range(k):
    p = n * k + j
    contrib = w_ref[p] * g_refs[j][...]
    carry = jnp.where(start_ref[p] != 0, contrib, carry + contrib)
    out_ref[j] = carry
  carry_ref[...] = carry


# ----- calls ------------------------------------------------------------------------------------------


def _forward_call(values, idx_BxL, w_BxL, bs: BlockSizes, interpret: bool):
  (m, d), (b, bag), k = values.shape, idx_BxL.shape, bs.rows_per_step

  def row_spec(j):
    return pl.BlockSpec((None, 1, bs.block_d), lambda i, c, l, idx, w: (idx[i * bag + l * k + j], 0, c))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, d // bs.block_d, bag // k),
      in_specs=[row_spec(j) for j in range(k)],
      out_specs=pl.BlockSpec((None, 1, bs.block_d), lambda i, c, l, idx, w: (i, 0, c)),
      scratch_shapes=[pltpu.VMEM((1, bs.block_d), jnp.float32)])
  out = pl.pallas_call(
      functools.partial(_forward_kernel, bag=bag, k=k, num_slots=m), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, 1, d), jnp.float32),
      compiler_params=_params("parallel", "parallel", "arbitrary"), interpret=interpret,
      name="memjax_bag_forward",
  )(jnp.clip(idx_BxL, 0, m - 1).reshape(-1), w_BxL.astype(jnp.float32).reshape(-1), *[_rows(values)] * k)
  return out.reshape(b, d)


def _weight_grad_call(values, idx_BxL, dout_BxD, bs: BlockSizes, interpret: bool):
  (m, d), (b, bag), k = values.shape, idx_BxL.shape, bs.rows_per_step

  def row_spec(j):
    return pl.BlockSpec((None, 1, bs.block_d), lambda i, l, c, idx: (idx[i * bag + l * k + j], 0, c))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, bag // k, d // bs.block_d),
      in_specs=[*[row_spec(j) for j in range(k)],
                pl.BlockSpec((None, 1, bs.block_d), lambda i, l, c, idx: (i, 0, c))],
      out_specs=pl.BlockSpec((None, 1, bag), lambda i, l, c, idx: (i, 0, 0)))
  dw = pl.pallas_call(
      functools.partial(_weight_grad_kernel, bag=bag, k=k), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, 1, bag), jnp.float32),
      compiler_params=_params("parallel", "arbitrary", "arbitrary"), interpret=interpret,
      name="memjax_bag_weight_grad",
  )(jnp.clip(idx_BxL, 0, m - 1).reshape(-1), *[_rows(values)] * k, _rows(dout_BxD.astype(jnp.float32)))
  return dw.reshape(b, bag)


def _segment_scan_call(bag_N, w_N, start_N, dout_BxD, carry_in_D, bs: BlockSizes, interpret: bool):
  """Running sums of w * d_out[bag] over sorted lookups, restarting where start_N is set: [N, Dv]."""
  n, d, k = bag_N.shape[0], dout_BxD.shape[1], bs.rows_per_step

  def g_spec(j):
    return pl.BlockSpec((None, 1, bs.block_d), lambda c, i, bag, w, st: (bag[i * k + j], 0, c))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(d // bs.block_d, n // k),
      in_specs=[*[g_spec(j) for j in range(k)],
                pl.BlockSpec((None, 1, bs.block_d), lambda c, i, bag, w, st: (0, 0, c))],
      out_specs=pl.BlockSpec((k, 1, bs.block_d), lambda c, i, bag, w, st: (i, 0, c)),
      scratch_shapes=[pltpu.VMEM((1, bs.block_d), jnp.float32)])
  scan = pl.pallas_call(
      functools.partial(_segment_scan_kernel, k=k), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((n, 1, d), jnp.float32),
      compiler_params=_params("parallel", "arbitrary"), interpret=interpret,
      name="memjax_bag_segment_scan",
  )(bag_N, w_N, start_N, *[_rows(dout_BxD)] * k, carry_in_D.reshape(1, 1, d))
  return scan.reshape(n, d)


def _chunks(total: int, size: int):
  return [(s, min(total, s + size)) for s in range(0, total, size)]


def _run_grads(idx_BxL, w_BxL, dout_BxD, num_slots, bs: BlockSizes, interpret: bool):
  """(run_rows [N], grads [N, Dv] fp32) by the segment scan over lookups sorted by row."""
  bag, n, d = idx_BxL.shape[1], idx_BxL.size, dout_BxD.shape[1]
  order_N, rows_N = xla.sort_lookups(idx_BxL.reshape(-1))
  run_start_N, run_off_U1, run_rows_U = xla.run_layout(rows_N, num_slots)
  bag_N = order_N // bag
  w_N = w_BxL.reshape(-1).astype(jnp.float32)[order_N]
  start_N = run_start_N.astype(jnp.int32)
  dout_BxD = dout_BxD.astype(jnp.float32)
  carry_D, pieces = jnp.zeros((d,), jnp.float32), []
  for lo, hi in _chunks(n, bs.lookups_per_call):  # SMEM holds one chunk of the scalars
    scan = _segment_scan_call(bag_N[lo:hi], w_N[lo:hi], start_N[lo:hi], dout_BxD, carry_D, bs, interpret)
    pieces.append(scan)
    carry_D = scan[-1]
  scan_NxD = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
  # Run u ends just before run u + 1 starts; padding runs (offset n) read a clamped row, zeroed.
  ends_U = run_off_U1[1:] - 1
  grads = jnp.where((run_off_U1[:-1] < n)[:, None], jnp.take(scan_NxD, jnp.clip(ends_U, 0, n - 1), axis=0), 0.0)
  return run_rows_U, grads


# ----- the backend ------------------------------------------------------------------------------------


def forward(values, idx_BxL, w_BxL, *, block_sizes=None, interpret=False):
  bag = idx_BxL.shape[1]
  bs = _resolve(block_sizes, bag, values.shape[1])
  bags_per_call = max(1, bs.lookups_per_call // bag)
  outs = [_forward_call(values, idx_BxL[lo:hi], w_BxL[lo:hi], bs, interpret)
          for lo, hi in _chunks(idx_BxL.shape[0], bags_per_call)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def _weight_grad(values, idx_BxL, dout_BxD, bs: BlockSizes, interpret: bool):
  bags_per_call = max(1, bs.lookups_per_call // idx_BxL.shape[1])
  dws = [_weight_grad_call(values, idx_BxL[lo:hi], dout_BxD[lo:hi], bs, interpret)
         for lo, hi in _chunks(idx_BxL.shape[0], bags_per_call)]
  return dws[0] if len(dws) == 1 else jnp.concatenate(dws)


def backward(values, idx_BxL, w_BxL, dout_BxD, *, block_sizes=None, interpret=False):
  m = values.shape[0]
  bs = _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])
  dw = _weight_grad(values, idx_BxL, dout_BxD, bs, interpret)
  rows, grads = _run_grads(jnp.clip(idx_BxL, 0, m - 1), w_BxL, dout_BxD, m, bs, interpret)
  dv = jnp.zeros(values.shape, values.dtype).at[rows].set(grads.astype(values.dtype), mode="drop",
                                                          unique_indices=True)
  return dv, dw


def row_grads(idx_BxL, w_BxL, dout_BxD, num_slots, *, block_sizes=None, interpret=False):
  bs = _resolve(block_sizes, idx_BxL.shape[1], dout_BxD.shape[1])
  return _run_grads(idx_BxL, w_BxL, dout_BxD, num_slots, bs, interpret)
