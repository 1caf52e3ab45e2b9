"""The ``pallas_tpu`` backend: embedding-bag kernels in Pallas/Mosaic that stream rows from HBM.

Shapes (flattened bags): values [M, Dv], idx [B, L] int32, w [B, L], d_out [B, Dv], N = B * L.
Tiles: bd = block_d value columns per copied row slice; G = bags_per_step; L8 = L rounded up to a
multiple of 8 (bags are padded with weight-0 lookups of row 0); K = rows copied per grid step.

How rows move. The table (and d_out, for the value gradient) stays in HBM (``memory_space=pl.ANY``);
the kernels copy the rows they need with ``pltpu.make_async_copy``, one DMA per row slice
[1, bd], into a VMEM buffer of two slots of K rows: at grid step s they start the copies of step s + 1
into the other slot, then wait for step s's K rows and reduce them, so the DMA engine streams while
the vector unit sums. The chain of steps runs along an "arbitrary" grid axis; the parallel axis
(column blocks, or halves of the bags) starts its own chain, so megacore chips split the work.
The row indices (and weights, sorted keys) are scalar-prefetched into SMEM; SMEM holds 1 MiB per
core, so calls are split into chunks of at most ``lookups_per_call`` lookups; chunked outputs are
written in place (``input_output_aliases``) instead of concatenated.

bf16 tables. TPU HBM tiles a bf16 [M, Dv] array as (8, 128)(2, 1): rows 2i and 2i + 1 share each
32-bit word, so one bf16 row is not addressable by a DMA (Mosaic rejects the slice). The kernels view
the table as uint32 [M / 2, Dv] (a ref bitcast: no copy), copy the word row holding the wanted row
and keep its low (even row) or high (odd row) half. A bf16 gather therefore moves 2x the bf16 bytes,
the same as an fp32 gather. (A table stored with two columns per word would avoid it.) Tables with
odd M handle row M - 1 outside the kernel (a [B, L] mask and an outer product).

Kernels (fp32 accumulation; no atomics):
  forward        grid (2 parallel halves of the bag steps, bag steps, Dv / bd), one chain of steps
                 per half: step (s, c) copies the K = G * L8 row slices of G bags and writes the
                 output block [G, bd]; each 8-row tile is weighted by a column of 8 SMEM weights and
                 summed per bag.
  weight grad    the forward's grid and chain: dots of each copied row slice with d_out[b]
                 accumulate across the column blocks in VMEM; after the last block they are
                 transposed into the lane-major dw block [G, L8].
  segment sum    grid (Dv / bd parallel, N / K arbitrary) over the lookups sorted by row
                 (``xla.py``): step s copies d_out[bag of sorted lookup] for K lookups, runs a
                 sum that restarts at every new key, and at the last lookup of a key DMAs the sum
                 to output row ``key``: key = run number (row_grads: [N, Dv] fp32; the last call
                 DMAs zeros to the padding rows U .. N) or table row (dense d_values: [M, Dv],
                 written straight into a zero table; bf16 tables write a packed word row per row
                 pair). A run open at a chunk's end is carried to the next. The sum runs one row
                 at a time ([1, bd] vector ops, 1/8 of the VPU's sublanes): the kernel that most
                 likely falls short of its roofline on hardware.

Roofline (bytes the kernel moves / HBM bandwidth; ``roofline_seconds``) per chip, from Google Cloud's
TPU pages (2026-12): v5e 819 GB/s (cloud.google.com/tpu/docs/v5e), v5p 2765 GB/s
(cloud.google.com/tpu/docs/v5p), v6e 1640 GB/s (cloud.google.com/tpu/docs/v6e says 1638 GBps; JAX's
pallas/mosaic/tpu_info.py uses 1.64e12). Each pallas_call carries a ``pl.CostEstimate`` of the same
bytes, so XLA's ``optimal_seconds`` for a kernel-only program is that estimate through XLA's cost
model, not a measurement.

``interpret=True`` runs the kernels in Pallas interpret mode (any platform; tests on CPU). Interpret
mode cannot DMA into a bitcast ref, so there the bf16 dense gradient's word rows come back as a
uint32 array that XLA unpacks (the kernel body is the same).

Compiling deviceless (benchmarks/kernel_compile.py): kernels avoid ``//`` and ``%`` on traced
integers (shifts and masks instead), whose Mosaic lowering asks ``get_tpu_info()`` for the device.
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
_SUBLANES = 8
_F32 = jnp.float32
# ``for_shape`` takes the widest block_d up to _WIDEST_BLOCK_D whose VMEM row slot (the kernels use two,
# plus staging) fits _SLOT_BYTES: wide slices mean fewer DMA descriptors, which the scalar unit issues
# one by one.
_SLOT_BYTES = 8 << 20
_WIDEST_BLOCK_D = 2048
HBM_BYTES_PER_SECOND = {"v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}


def _largest_divisor(n: int, cap: int, step: int = 1) -> int:
  """The largest multiple of ``step`` that is <= cap and divides n (0 if none)."""
  for b in range(cap - cap % step, 0, -step):
    if n % b == 0:
      return b
  return 0


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the Mosaic kernels.

  block_d: value columns per copied row slice; a multiple of 128 dividing value_dim.
  bags_per_step: G, bags per grid step of the forward and weight-gradient kernels (a multiple of 8:
    the sublanes of their output blocks). A step copies G * L8 rows.
  rows_per_step: K, sorted lookups per grid step of the segment-sum kernel (a multiple of 8).
  lookups_per_call: the most lookups scalar-prefetched into SMEM by one kernel call.

  (The row-per-operand kernels this replaced had ``rows_per_step`` dividing the bag size; the
  streaming kernels pad bags to L8 instead, so no divisibility of L is needed.)
  """

  block_d: int = 512
  bags_per_step: int = 8
  rows_per_step: int = 512
  lookups_per_call: int = 32768

  def __post_init__(self):
    if not isinstance(self.block_d, int) or self.block_d <= 0 or self.block_d % _LANES:
      raise ValueError(f"BlockSizes.block_d={self.block_d!r} must be a positive multiple of {_LANES}")
    for name in ("bags_per_step", "rows_per_step"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % _SUBLANES:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive multiple of {_SUBLANES}")
    if not isinstance(self.lookups_per_call, int) or self.lookups_per_call <= 0:
      raise ValueError(f"BlockSizes.lookups_per_call={self.lookups_per_call!r} must be a positive int")
    if self.lookups_per_call % self.rows_per_step:
      raise ValueError(f"BlockSizes.lookups_per_call={self.lookups_per_call} must be a multiple of "
                       f"rows_per_step={self.rows_per_step}")

  @classmethod
  def for_shape(cls, bag_size: int, value_dim: int) -> "BlockSizes":
    """The defaults, with block_d the widest divisor of value_dim (<= 2048) whose slot of
    bags_per_step * L8 rows fits 8 MiB."""
    d = cls()
    if value_dim % _LANES:
      raise ValueError(f"{value_dim=} must be a multiple of {_LANES} for backend 'pallas_tpu'")
    rows = d.bags_per_step * _round_up(bag_size, _SUBLANES)
    cap = max(_LANES, min(_WIDEST_BLOCK_D, _SLOT_BYTES // (4 * rows)))
    return cls(block_d=_largest_divisor(value_dim, cap, _LANES), bags_per_step=d.bags_per_step,
               rows_per_step=d.rows_per_step, lookups_per_call=d.lookups_per_call)


def _resolve(block_sizes, bag_size: int, value_dim: int) -> BlockSizes:
  if block_sizes is None:
    return BlockSizes.for_shape(bag_size, value_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"backend 'pallas_tpu' takes pallas_tpu.BlockSizes, got {block_sizes=}")
  if value_dim % block_sizes.block_d:
    raise ValueError(f"{value_dim=} must be a multiple of block_d={block_sizes.block_d}")
  return block_sizes


def check(values, idx_BxL, w_BxL, block_sizes=None) -> None:
  """Raises ValueError naming the shape or dtype the Mosaic kernels cannot take."""
  del w_BxL
  if values.dtype not in SUPPORTED_VALUE_DTYPES:
    raise ValueError(f"backend 'pallas_tpu' supports values.dtype in (float32, bfloat16), got {values.dtype=}")
  _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])


def _params(*semantics, vmem_bytes: int):
  # Scoped VMEM defaults to 16 MiB (v5e) or 32 MiB; ask for what the buffers need plus headroom.
  limit = min(max(vmem_bytes + (vmem_bytes >> 2) + (4 << 20), 16 << 20), 56 << 20)
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _packed(values) -> bool:
  return values.dtype == jnp.bfloat16


# ----- pieces shared by the kernels ------------------------------------------------------------------


def _row_table(table_hbm, packed: bool):
  """The table as DMA-addressable rows: bf16 rows as uint32 word rows of two table rows (an odd
  last row is left out: its lookups never reach the kernel)."""
  if not packed:
    return table_hbm
  m = table_hbm.shape[0]
  return (table_hbm if m % 2 == 0 else table_hbm.at[pl.ds(0, m - 1)]).bitcast(jnp.uint32)


def _start_rows(row_of, count: int, table, buf_slot, sem, col0, bd: int):
  """Starts ``count`` DMAs: table[row_of(j), col0:col0 + bd] -> buf_slot[j]."""
  def body(j, carry):
    pltpu.make_async_copy(table.at[pl.ds(row_of(j), 1), pl.ds(col0, bd)], buf_slot.at[pl.ds(j, 1)],
                          sem).start()
    return carry
  lax.fori_loop(0, count, body, 0, unroll=_SUBLANES)


def _wait_rows(count, table, buf_slot, sem, bd: int):
  """Waits for ``count`` row DMAs of [1, bd] on ``sem`` (any row: only the size matters)."""
  def body(j, carry):
    pltpu.make_async_copy(table.at[pl.ds(0, 1), pl.ds(0, bd)], buf_slot.at[pl.ds(0, 1)], sem).wait()
    return carry
  lax.fori_loop(0, count, body, 0, unroll=_SUBLANES)


def _next_in_chain(s2, c, cols):
  """The (bag step, column block) after (s2, c) in a chain that runs the column blocks innermost."""
  last_col = c + 1 == cols
  return jnp.where(last_col, s2 + 1, s2), jnp.where(last_col, 0, c + 1)


def _halves(steps: int) -> int:
  """Bag steps split in two parallel chains when they can be (a megacore chip runs one per core)."""
  return 2 if steps % 2 == 0 else 1


def _column(scalars, dtype):
  """An [8, 128] array whose row i is scalars[i] (8 SMEM scalars -> one vreg)."""
  sub = lax.broadcasted_iota(jnp.int32, (_SUBLANES, _LANES), 0)
  col = jnp.full((_SUBLANES, _LANES), scalars[0], dtype)
  for i in range(1, _SUBLANES):
    col = jnp.where(sub == i, jnp.asarray(scalars[i], dtype), col)
  return col


def _widen(col_8x128, bd: int):
  return col_8x128 if bd == _LANES else jnp.tile(col_8x128, (1, bd // _LANES))


def _unpack_rows(words, odd):
  """uint32 word rows -> fp32 of the even (low half) or odd (high half) bf16 row."""
  lo = lax.bitcast_convert_type(words << 16, _F32)
  hi = lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), _F32)
  return jnp.where(odd, hi, lo)


def _pack_rows(lo_f32, hi_f32):
  """Two fp32 rows -> uint32 words of their bf16 values (round to nearest even), lo in bits 0-15."""
  def bf16_bits(x):
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    rounded = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    return rounded >> 16
  return bf16_bits(lo_f32) | (bf16_bits(hi_f32) << 16)


def _gather_tile(buf_slot, row0, idx_ref, p0, packed: bool, bd: int):
  """Rows row0 .. row0 + 8 of a copy slot as fp32 [8, bd]; p0 is the first one's lookup number."""
  x = buf_slot[pl.ds(row0, _SUBLANES), :]
  if not packed:
    return x.astype(_F32)
  odd = _column([idx_ref[p0 + i] & 1 for i in range(_SUBLANES)], jnp.int32) != 0
  return _unpack_rows(x, _widen(odd, bd))


# ----- forward ---------------------------------------------------------------------------------------


def _forward_kernel(idx_ref, w_ref, values_hbm, *refs, groups: int, bag8: int, bd: int, packed: bool):
  # idx_ref, w_ref: SMEM [chunk lookups]; values_hbm: HBM [M, Dv]; refs: (out_prev?), out [G, bd],
  # buf VMEM [2, K, bd], sem DMA [2].
  out_ref, buf, sem = refs[-3:]
  h, s2, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  half, cols = pl.num_programs(1), pl.num_programs(2)
  k = groups * bag8
  table = _row_table(values_hbm, packed)
  q = s2 * cols + c  # position in this half's chain of (bag step, column block)

  def start(step, col, slot):
    first = (h * half + step) * k
    row_of = (lambda j: idx_ref[first + j] >> 1) if packed else (lambda j: idx_ref[first + j])
    _start_rows(row_of, k, table, buf.at[slot], sem.at[slot], pl.multiple_of(col * bd, _LANES), bd)

  @pl.when(q == 0)
  def _():
    start(0, 0, 0)

  next_s2, next_c = _next_in_chain(s2, c, cols)

  @pl.when(next_s2 < half)
  def _():
    start(next_s2, next_c, (q + 1) & 1)

  slot = q & 1
  _wait_rows(k, table, buf.at[slot], sem.at[slot], bd)
  first = (h * half + s2) * k
  for g in range(groups):
    def tile(t, acc_8xD, g=g):
      row0 = pl.multiple_of(g * bag8 + t * _SUBLANES, _SUBLANES)
      p0 = first + row0
      x_8xD = _gather_tile(buf.at[slot], row0, idx_ref, p0, packed, bd)
      w_8xD = _widen(_column([w_ref[p0 + i] for i in range(_SUBLANES)], _F32), bd)
      return acc_8xD + w_8xD * x_8xD
    acc_8xD = lax.fori_loop(0, bag8 // _SUBLANES, tile, jnp.zeros((_SUBLANES, bd), _F32))
    out_ref[g:g + 1, :] = jnp.sum(acc_8xD, axis=0, keepdims=True)


def _forward_call(values, idx_CxL, w_CxL, out_prev, bag0: int, bags_total: int, bs: BlockSizes,
                  interpret: bool):
  """Output rows bag0 .. bag0 + C of a [bags_total, Dv] fp32 buffer (written in place of out_prev)."""
  (m, d), (nb, bag8) = values.shape, idx_CxL.shape
  g, bd, packed = bs.bags_per_step, bs.block_d, _packed(values)
  k, steps = g * bag8, nb // g
  halves = _halves(steps)
  half, step0 = steps // halves, bag0 // g
  kernel = functools.partial(_forward_kernel, groups=g, bag8=bag8, bd=bd, packed=packed)
  in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
  args = [idx_CxL.reshape(-1), w_CxL.reshape(-1), values]
  if out_prev is not None:
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    args.append(out_prev)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(halves, half, d // bd), in_specs=in_specs,
      out_specs=pl.BlockSpec((g, bd), lambda h, s, c, idx, w: (h * half + s + step0, c)),
      scratch_shapes=[pltpu.VMEM((2, k, bd), jnp.uint32 if packed else values.dtype),
                      pltpu.SemaphoreType.DMA((2,))])
  row_bytes = bd * 4  # a packed bf16 row slice is a uint32 word row
  moved = nb * bag8 * (d // bd) * row_bytes + nb * d * 4 + nb * bag8 * 8
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((bags_total, d), _F32),
      input_output_aliases={3: 0} if out_prev is not None else {},
      compiler_params=_params("parallel", "arbitrary", "arbitrary",
                              vmem_bytes=2 * k * row_bytes + 2 * g * bd * 4),
      cost_estimate=pl.CostEstimate(flops=2 * nb * bag8 * d, transcendentals=0, bytes_accessed=moved),
      interpret=interpret, name="memjax_bag_forward",
  )(*args)


# ----- weight gradient -------------------------------------------------------------------------------


def _weight_grad_kernel(idx_ref, values_hbm, dout_ref, *refs, groups: int, bag8: int, bag128: int,
                        bd: int, packed: bool):
  # dout_ref [G, bd] (d_out of the step's bags); refs: (dw_prev?), dw [G, L8], buf VMEM [2, K, bd],
  # dots VMEM [G * bag128, 128] (dot of each row, broadcast over lanes; summed over column blocks),
  # sem DMA [2].
  dw_ref, buf, dots, sem = refs[-4:]
  h, s2, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  half, cols = pl.num_programs(1), pl.num_programs(2)
  k = groups * bag8
  table = _row_table(values_hbm, packed)
  q = s2 * cols + c  # position in this half's chain of (step, column block)

  def start(step, col, slot):
    first = (h * half + step) * k
    row_of = (lambda j: idx_ref[first + j] >> 1) if packed else (lambda j: idx_ref[first + j])
    _start_rows(row_of, k, table, buf.at[slot], sem.at[slot], pl.multiple_of(col * bd, _LANES), bd)

  @pl.when(q == 0)
  def _():
    start(0, 0, 0)

  next_s2, next_c = _next_in_chain(s2, c, cols)

  @pl.when(next_s2 < half)
  def _():
    start(next_s2, next_c, (q + 1) & 1)

  slot = q & 1
  _wait_rows(k, table, buf.at[slot], sem.at[slot], bd)
  first = (h * half + s2) * k
  for g in range(groups):
    g_1xD = dout_ref[g:g + 1, :].astype(_F32)

    def tile(t, carry, g=g, g_1xD=g_1xD):
      row0 = pl.multiple_of(g * bag8 + t * _SUBLANES, _SUBLANES)
      x_8xD = _gather_tile(buf.at[slot], row0, idx_ref, first + row0, packed, bd)
      dot_8x1 = jnp.sum(x_8xD * g_1xD, axis=1, keepdims=True)
      at = pl.ds(pl.multiple_of(g * bag128 + t * _SUBLANES, _SUBLANES), _SUBLANES)
      dots[at, :] = jnp.broadcast_to(dot_8x1, (_SUBLANES, _LANES)) + jnp.where(c == 0, 0.0, dots[at, :])
      return carry
    lax.fori_loop(0, bag8 // _SUBLANES, tile, 0)

  @pl.when(c + 1 == cols)
  def _():
    for g in range(groups):
      rows_Lx128 = dots[g * bag128:(g + 1) * bag128, :]
      dw_ref[g:g + 1, :] = rows_Lx128.T[0:1, :bag8]


def _weight_grad_call(values, idx_CxL, dout_BxD, dw_prev, bag0: int, bags_total: int, bs: BlockSizes,
                      interpret: bool):
  (m, d), (nb, bag8) = values.shape, idx_CxL.shape
  g, bd, packed = bs.bags_per_step, bs.block_d, _packed(values)
  k, bag128, steps = g * bag8, _round_up(bag8, _LANES), nb // g
  halves = _halves(steps)
  step0 = bag0 // g
  kernel = functools.partial(_weight_grad_kernel, groups=g, bag8=bag8, bag128=bag128, bd=bd, packed=packed)
  in_specs = [pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec((g, bd), lambda h, s, c, idx: (h * (steps // halves) + s + step0, c))]
  args = [idx_CxL.reshape(-1), values, dout_BxD]  # all of d_out: its block index adds bag0
  if dw_prev is not None:
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    args.append(dw_prev)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(halves, steps // halves, d // bd), in_specs=in_specs,
      out_specs=pl.BlockSpec((g, bag8), lambda h, s, c, idx: (h * (steps // halves) + s + step0, 0)),
      scratch_shapes=[pltpu.VMEM((2, k, bd), jnp.uint32 if packed else values.dtype),
                      pltpu.VMEM((g * bag128, _LANES), _F32), pltpu.SemaphoreType.DMA((2,))])
  row_bytes = bd * 4
  moved = nb * bag8 * (d // bd) * row_bytes + nb * d * 4 + nb * bag8 * 8
  vmem = 2 * k * row_bytes + g * bag128 * _LANES * 4 + 2 * g * (bd + bag8) * 4
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((bags_total, bag8), _F32),
      input_output_aliases={3: 0} if dw_prev is not None else {},
      compiler_params=_params("parallel", "arbitrary", "arbitrary", vmem_bytes=vmem),
      cost_estimate=pl.CostEstimate(flops=2 * nb * bag8 * d, transcendentals=0, bytes_accessed=moved),
      interpret=interpret, name="memjax_bag_weight_grad",
  )(*args)


# ----- segment sum over sorted lookups ----------------------------------------------------------------


def _segment_kernel(src_ref, w_ref, key_ref, flags_ref, dout_hbm, carry_in_ref, *refs, k: int, bd: int,
                    chunk: int, packed: bool, out_rows: int, zero_tail: bool):
  # src/w/key: SMEM [chunk] (d_out row, weight, output key of each sorted lookup); flags: SMEM [5]
  # (the first key continues the previous chunk's; the last key continues into the next chunk;
  # for zero_tail: the number of keys U, U rounded up to K, that over K); dout_hbm HBM [B, Dv] fp32;
  # carry_in/out [8, bd] (rows 0, 1: the open run's sums); refs: (out_prev?), then out HBM (aliased
  # to out_prev): [keys, Dv] fp32, or uint32 [M / 2, Dv] words of a bf16 table; then scratch.
  out_hbm, carry_out_ref, buf, stage, carry, sem, wsem, nwrites = refs[-8:]
  c, s, steps = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
  col0 = pl.multiple_of(c * bd, _LANES)
  out = out_hbm.bitcast(jnp.uint32) if packed and out_hbm.dtype != jnp.uint32 else out_hbm

  def start(step, slot):
    first = step * k
    _start_rows(lambda j: src_ref[first + j], k, dout_hbm, buf.at[slot], sem.at[slot], col0, bd)

  @pl.when(s == 0)
  def _():
    start(0, 0)
    carry[...] = carry_in_ref[...]

  @pl.when(s + 1 < steps)
  def _():
    start(s + 1, (s + 1) & 1)

  slot = s & 1
  _wait_rows(k, dout_hbm, buf.at[slot], sem.at[slot], bd)
  nwrites[0] = 0

  def key_of(p):  # the output row a lookup's sum goes to
    return key_ref[p] >> 1 if packed else key_ref[p]

  def lookup(j, acc):
    acc_lo, acc_hi = acc
    p = s * k + j
    key = key_of(p)
    starts = jnp.where(p == 0, flags_ref[0] == 0, key != key_of(jnp.maximum(p - 1, 0)))
    ends = jnp.where(p == chunk - 1, flags_ref[1] == 0, key != key_of(jnp.minimum(p + 1, chunk - 1)))
    contrib = w_ref[p] * buf[slot, pl.ds(j, 1), :]
    acc_lo = jnp.where(starts, 0.0, acc_lo)
    if packed:  # even rows sum into the low half of the word row, odd rows into the high half
      odd = (key_ref[p] & 1) == 1
      acc_hi = jnp.where(starts, 0.0, acc_hi) + jnp.where(odd, contrib, 0.0)
      acc_lo = acc_lo + jnp.where(odd, 0.0, contrib)
    else:
      acc_lo = acc_lo + contrib

    @pl.when(ends)
    def _():
      stage[pl.ds(j, 1), :] = _pack_rows(acc_lo, acc_hi) if packed else acc_lo
      pltpu.make_async_copy(stage.at[pl.ds(j, 1)], out.at[pl.ds(key, 1), pl.ds(col0, bd)], wsem.at[0]).start()
      nwrites[0] += 1
    return acc_lo, acc_hi

  acc_lo, acc_hi = lax.fori_loop(0, k, lookup, (carry[0:1, :], carry[1:2, :]))
  carry[0:1, :] = acc_lo
  carry[1:2, :] = acc_hi

  def rows_copy(rows, r0):  # stage rows -> out rows r0 .. r0 + rows (waits need only the size)
    return pltpu.make_async_copy(stage.at[pl.ds(0, rows)], out.at[pl.ds(r0, rows), pl.ds(col0, bd)],
                                 wsem.at[0])

  def wait_one(i, c_):
    rows_copy(1, 0).wait()
    return c_
  lax.fori_loop(0, nwrites[0], wait_one, 0)

  @pl.when(s == steps - 1)
  def _():
    carry_out_ref[...] = carry[...]

  if zero_tail:  # the last call writes zeros to the rows no key reached: U .. out_rows
    @pl.when(s == steps - 1)
    def _():
      stage[...] = jnp.zeros_like(stage)
      keys, keys_up, block0 = flags_ref[2], flags_ref[3], flags_ref[4]
      rows_down = out_rows // k * k
      ranges = [(1, keys, keys_up), (k, block0, rows_down // k), (1, jnp.maximum(keys_up, rows_down), out_rows)]
      for rows, lo, hi in ranges:
        def start_zeros(r, c_, rows=rows):
          rows_copy(rows, pl.multiple_of(r * rows, rows) if rows > 1 else r).start()
          return c_
        lax.fori_loop(lo, hi, start_zeros, 0)
      for rows, lo, hi in ranges:
        def wait_zeros(r, c_, rows=rows):
          rows_copy(rows, 0).wait()
          return c_
        lax.fori_loop(lo, hi, wait_zeros, 0)


def _segment_call(src_C, w_C, key_C, flags, dout_BxD, carry_8xD, out, packed: bool, zero_tail: bool,
                  bs: BlockSizes, interpret: bool):
  """One chunk of sorted lookups: (out with the chunk's finished keys written, carry_8xD).

  ``out`` is the buffer to write in place, or a ShapeDtypeStruct for the first call to create."""
  chunk, d, k, bd = src_C.shape[0], dout_BxD.shape[1], bs.rows_per_step, bs.block_d
  kernel = functools.partial(_segment_kernel, k=k, bd=bd, chunk=chunk, packed=packed, out_rows=out.shape[0],
                             zero_tail=zero_tail)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  carry_spec = pl.BlockSpec((_SUBLANES, bd), lambda c, s, *_: (0, c))
  create = isinstance(out, jax.ShapeDtypeStruct)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(d // bd, chunk // k),
      in_specs=[any_spec, carry_spec] + ([] if create else [any_spec]), out_specs=[any_spec, carry_spec],
      scratch_shapes=[pltpu.VMEM((2, k, bd), _F32), pltpu.VMEM((k, bd), jnp.uint32 if packed else _F32),
                      pltpu.VMEM((_SUBLANES, bd), _F32), pltpu.SemaphoreType.DMA((2,)),
                      pltpu.SemaphoreType.DMA((1,)), pltpu.SMEM((1,), jnp.int32)])
  moved = 2 * chunk * d * 4 + chunk * 12  # rows in, at most one sum out per lookup, scalars
  args = (src_C, w_C, key_C, flags, dout_BxD, carry_8xD) + (() if create else (out,))
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct(out.shape, out.dtype), jax.ShapeDtypeStruct((_SUBLANES, d), _F32)),
      input_output_aliases={} if create else {6: 0},
      compiler_params=_params("parallel", "arbitrary", vmem_bytes=3 * k * bd * 4 + 4 * _SUBLANES * bd * 4),
      cost_estimate=pl.CostEstimate(flops=2 * chunk * d, transcendentals=0, bytes_accessed=moved),
      interpret=interpret, name="memjax_bag_segment_sum",
  )(*args)


def _chunks(total: int, size: int):
  return [(s, min(total, s + size)) for s in range(0, total, size)]


def _segment_sum(src_N, w_N, key_N, dout_BxD, out, packed: bool, bs: BlockSizes, interpret: bool):
  """Writes, for every key, the sum of w * d_out[src] over its lookups (sorted by key) into ``out``.

  ``out``: a zero array (rows no key reaches stay as they are), or a ShapeDtypeStruct: then the keys
  must be 0 .. U - 1 in order (runs), and the last call zeroes rows U and after."""
  n, k = src_N.shape[0], bs.rows_per_step
  n_pad = _round_up(n, k)
  zero_tail = isinstance(out, jax.ShapeDtypeStruct)
  keys = key_N[-1].astype(jnp.int32) + 1  # for runs: U
  keys_up = jnp.minimum((keys + k - 1) // k * k, out.shape[0])
  if n_pad != n:  # weight-0 lookups of the last key
    pad = n_pad - n
    src_N = jnp.concatenate([src_N, jnp.zeros((pad,), jnp.int32)])
    w_N = jnp.concatenate([w_N, jnp.zeros((pad,), _F32)])
    key_N = jnp.concatenate([key_N, jnp.broadcast_to(key_N[-1:], (pad,))])
  cmp_N = key_N >> 1 if packed else key_N
  carry = jnp.zeros((_SUBLANES, dout_BxD.shape[1]), _F32)
  chunks = _chunks(n_pad, bs.lookups_per_call)  # SMEM holds one chunk of the scalars
  for i, (lo, hi) in enumerate(chunks):
    cont_in = cmp_N[lo - 1] == cmp_N[lo] if lo > 0 else jnp.bool_(False)
    cont_out = cmp_N[hi - 1] == cmp_N[hi] if hi < n_pad else jnp.bool_(False)
    flags = jnp.stack([cont_in.astype(jnp.int32), cont_out.astype(jnp.int32), keys, keys_up, keys_up // k])
    out, carry = _segment_call(src_N[lo:hi], w_N[lo:hi], key_N[lo:hi], flags, dout_BxD, carry, out, packed,
                               zero_tail and i == len(chunks) - 1, bs, interpret)
  return out


def _sorted_lookups(idx_BxL, w_BxL):
  """(order_N, rows_N, src_N, w_N): lookups sorted by row, the bag and weight of each."""
  bag = idx_BxL.shape[1]
  order_N, rows_N = xla.sort_lookups(idx_BxL.reshape(-1))
  src_N = (order_N // bag).astype(jnp.int32)
  w_N = w_BxL.reshape(-1).astype(_F32)[order_N]
  return order_N, rows_N.astype(jnp.int32), src_N, w_N


def _run_grads(idx_BxL, w_BxL, dout_BxD, num_slots, bs: BlockSizes, interpret: bool):
  """(run_rows [N], grads [N, Dv] fp32): the segment sum with one key per run of equal rows."""
  n = idx_BxL.size
  _, rows_N, src_N, w_N = _sorted_lookups(idx_BxL, w_BxL)
  run_start_N, _, run_rows_U = xla.run_layout(rows_N, num_slots)
  run_N = jnp.cumsum(run_start_N.astype(jnp.int32)) - 1
  grads = jax.ShapeDtypeStruct((n, dout_BxD.shape[1]), _F32)  # the last call zeroes the padding runs
  grads = _segment_sum(src_N, w_N, run_N, dout_BxD.astype(_F32), grads, False, bs, interpret)
  return run_rows_U, grads


def _dense_grad(values, idx_BxL, w_BxL, dout_BxD, bs: BlockSizes, interpret: bool):
  """d_values [M, Dv] in values.dtype: each touched row's sum written into a zero table."""
  m = values.shape[0]
  _, rows_N, src_N, w_N = _sorted_lookups(idx_BxL, w_BxL)
  dout_BxD = dout_BxD.astype(_F32)
  if values.dtype == _F32:
    return _segment_sum(src_N, w_N, rows_N, dout_BxD, jnp.zeros(values.shape, _F32), False, bs, interpret)
  if m % 2 == 0 and not interpret:  # the kernel writes word rows through a bitcast of the bf16 table
    dv = jnp.zeros(values.shape, values.dtype)
    return _segment_sum(src_N, w_N, rows_N, dout_BxD, dv, True, bs, interpret)
  if m % 2 == 0:  # interpret mode cannot DMA into a bitcast ref: the same words, unpacked by XLA
    words = jnp.zeros((m // 2, values.shape[1]), jnp.uint32)
    words = _segment_sum(src_N, w_N, rows_N, dout_BxD, words, True, bs, interpret)
    halves = lax.bitcast_convert_type(words, jnp.bfloat16)  # [M / 2, Dv, 2]: (even row, odd row)
    return jnp.swapaxes(halves, 1, 2).reshape(values.shape)
  # bf16 with odd M has no whole word rows at the end: sum in fp32, then round.
  dv = _segment_sum(src_N, w_N, rows_N, dout_BxD, jnp.zeros(values.shape, _F32), False, bs, interpret)
  return dv.astype(values.dtype)


# ----- the backend ------------------------------------------------------------------------------------


def _bag_layout(idx_BxL, w_BxL, m: int, bs: BlockSizes, odd_row: int | None):
  """Clamped, padded [Bp, L8] indices and weights (None: no weights); lookups of ``odd_row`` get row
  0 and weight 0."""
  b, bag = idx_BxL.shape
  bag8, bp = _round_up(bag, _SUBLANES), _round_up(b, bs.bags_per_step)
  pad = ((0, bp - b), (0, bag8 - bag))
  idx = jnp.clip(idx_BxL, 0, m - 1).astype(jnp.int32)
  w = None if w_BxL is None else w_BxL.astype(_F32)
  if odd_row is not None:
    w = None if w is None else jnp.where(idx == odd_row, 0.0, w)
    idx = jnp.where(idx == odd_row, 0, idx)
  if (bp, bag8) != (b, bag):
    idx = jnp.pad(idx, pad)
    w = None if w is None else jnp.pad(w, pad)
  return idx, w


def _bag_chunks(bp: int, bag8: int, bs: BlockSizes):
  per_call = bs.bags_per_step * max(1, bs.lookups_per_call // (bs.bags_per_step * bag8))
  return _chunks(bp, per_call)


def _odd_row(values):
  """The last row of an odd-length bf16 table, which has no whole word row (None otherwise)."""
  m = values.shape[0]
  return m - 1 if _packed(values) and m % 2 else None


def forward(values, idx_BxL, w_BxL, *, block_sizes=None, interpret=False):
  (m, d), (b, bag) = values.shape, idx_BxL.shape
  bs = _resolve(block_sizes, bag, d)
  odd_row = _odd_row(values)
  idx, w = _bag_layout(idx_BxL, w_BxL, m, bs, odd_row)
  bp, bag8 = idx.shape
  out = None
  for lo, hi in _bag_chunks(bp, bag8, bs):
    out = _forward_call(values, idx[lo:hi], w[lo:hi], out, lo, bp, bs, interpret)
  out = out[:b] if bp != b else out
  if odd_row is not None:
    clipped = jnp.clip(idx_BxL, 0, m - 1)
    w_last = jnp.sum(jnp.where(clipped == odd_row, w_BxL.astype(_F32), 0.0), axis=1)
    out = out + w_last[:, None] * values[odd_row].astype(_F32)[None, :]
  return out


def _weight_grad(values, idx_BxL, dout_BxD, bs: BlockSizes, interpret: bool):
  (m, d), (b, bag) = values.shape, idx_BxL.shape
  odd_row = _odd_row(values)
  idx, _ = _bag_layout(idx_BxL, None, m, bs, odd_row)
  bp, bag8 = idx.shape
  dout = dout_BxD.astype(_F32)
  dout = jnp.pad(dout, ((0, bp - b), (0, 0))) if bp != b else dout
  dw = None
  for lo, hi in _bag_chunks(bp, bag8, bs):
    dw = _weight_grad_call(values, idx[lo:hi], dout, dw, lo, bp, bs, interpret)
  dw = dw[:b, :bag] if (bp, bag8) != (b, bag) else dw
  if odd_row is not None:
    clipped = jnp.clip(idx_BxL, 0, m - 1)
    last = dout_BxD.astype(_F32) @ values[odd_row].astype(_F32)
    dw = jnp.where(clipped == odd_row, last[:, None], dw)
  return dw


def backward(values, idx_BxL, w_BxL, dout_BxD, *, block_sizes=None, interpret=False):
  m = values.shape[0]
  bs = _resolve(block_sizes, idx_BxL.shape[1], values.shape[1])
  dw = _weight_grad(values, idx_BxL, dout_BxD, bs, interpret)
  dv = _dense_grad(values, jnp.clip(idx_BxL, 0, m - 1), w_BxL, dout_BxD, bs, interpret)
  return dv, dw


def row_grads(idx_BxL, w_BxL, dout_BxD, num_slots, *, block_sizes=None, interpret=False):
  bs = _resolve(block_sizes, idx_BxL.shape[1], dout_BxD.shape[1])
  return _run_grads(idx_BxL, w_BxL, dout_BxD, num_slots, bs, interpret)


def roofline_seconds(kernel: str, *, num_slots: int, value_dim: int, bags: int, bag_size: int,
                     value_dtype, chip: str) -> dict:
  """Bytes each kernel moves at these shapes and the time at the chip's HBM bandwidth.

  ``compulsory``: what any kernel must read and write (each gathered row once in its own dtype,
  outputs, indices and weights); ``moved``: what these kernels move (bf16 rows as word rows of two).
  """
  n, d = bags * bag_size, value_dim
  item = jnp.dtype(value_dtype).itemsize
  scalars = n * 8
  if kernel == "forward":
    compulsory, moved = n * d * item + bags * d * 4 + scalars, n * d * 4 + bags * d * 4 + scalars
  elif kernel == "weight_grad":
    compulsory, moved = n * d * item + bags * d * 4 + scalars, n * d * 4 + bags * d * 4 + scalars
  elif kernel == "row_grads":  # d_out rows in; all N output rows out (U run sums, then zeros)
    compulsory = moved = 2 * n * d * 4 + scalars + n * 4
  elif kernel == "backward_dense":  # d_out rows in, the [M, Dv] table out (zero-filled, then row sums)
    compulsory = n * d * 4 + num_slots * d * item + scalars
    moved = compulsory + min(n, num_slots) * d * 4
  else:
    raise ValueError(f"{kernel=} is not one of forward, weight_grad, row_grads, backward_dense")
  bw = HBM_BYTES_PER_SECOND[chip]
  return {"compulsory_bytes": compulsory, "moved_bytes": moved, "roofline_seconds": moved / bw,
          "compulsory_seconds": compulsory / bw}
