"""The XLA formulations of the embedding bag, and the one sort + segment sum of memjax.

Shapes (flattened bags): values [M, Dv], idx [B, L] int32, w [B, L], d_out [B, Dv], N = B * L
lookups, U <= N runs (distinct rows).

Two backends of ``embedding_bag`` are pure XLA and live here:
  xla        ``forward`` (take + einsum) and ``backward`` (dense scatter-add): the reference
  xla_loop   ``loop_forward`` / ``loop_backward``: a loop over the bag dimension (no [B, L, Dv]
             buffer), tuned for CPU; also the fallback of the ``cpu`` backend

Every value gradient of memjax is atomic-free and deterministic: the lookups are sorted by row
(stably) and each run of equal rows sums its own contributions in lookup order. That layout is
computed once, here (``sort_runs``), and read by the XLA row gradients (``sorted_row_grads``), the
numbering of a global batch's distinct rows in the sharded sparse update (``distinct_rows``) and
the Pallas kernels (``run_layout``, ``row_offsets``):

  order_N     [N]      lookup ids sorted by row (stable: ties keep lookup order)
  rows_N      [N]      idx_N[order_N], ascending
  run_start_N [N]      bool, True where a run of equal rows starts in rows_N
  run_id_N    [N]      the run number of each sorted lookup, 0 .. U-1
  run_off_U1  [N + 1]  start of run u in the sorted order, then N (padding runs are empty)
  run_rows_U  [N]      the row of run u, then ``num_slots`` (padding)
  row_off_M1  [M + 1]  start of row r's lookups in the sorted order (CSR "reverse indices")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


# ----- the sort: one layout for every value gradient -------------------------------------------------


def sort_lookups(idx_N):
  """Returns (order_N, rows_N): the lookups sorted by row, stably."""
  order_N = jnp.argsort(idx_N, stable=True).astype(jnp.int32)
  return order_N, idx_N[order_N]


def runs_of(rows_N):
  """(run_start_N, run_id_N) of ascending ``rows_N``: where each run of equal rows starts, and the
  run number of every entry."""
  run_start_N = jnp.concatenate([jnp.ones((1,), bool), rows_N[1:] != rows_N[:-1]])
  return run_start_N, jnp.cumsum(run_start_N.astype(jnp.int32)) - 1


def run_layout(rows_N, num_slots: int):
  """Returns (run_start_N, run_off_U1, run_rows_U) for ascending rows_N."""
  n = rows_N.shape[0]
  run_start_N, run_id_N = runs_of(rows_N)
  target_N = jnp.where(run_start_N, run_id_N, n)  # out of range for non-starts: dropped
  run_off_U1 = jnp.full((n + 1,), n, jnp.int32).at[target_N].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  run_rows_U = jnp.full((n,), num_slots, jnp.int32).at[target_N].set(rows_N.astype(jnp.int32), mode="drop")
  return run_start_N, run_off_U1, run_rows_U


def row_offsets(rows_N, num_slots: int):
  """CSR offsets [M + 1]: row r's lookups are sorted positions row_off[r] .. row_off[r + 1]."""
  return jnp.searchsorted(rows_N, jnp.arange(num_slots + 1, dtype=rows_N.dtype), side="left").astype(jnp.int32)


def sorted_row_grads(idx_BxL, w_BxL, dout_BxD, num_slots: int):
  """The value gradient as (rows [N], grads [N, Dv]): the sort + segment sum.

  ``rows`` are the distinct rows read, ascending, then padding ``num_slots``; ``grads[u]`` is the sum of
  ``w[b, l] * d_out[b]`` over the lookups of row ``rows[u]``, zero on padding (the contract of
  ``embedding_bag_row_grads``).
  """
  bag, n = idx_BxL.shape[1], idx_BxL.size
  order_N, rows_N = sort_lookups(idx_BxL.reshape(-1).astype(jnp.int32))
  _, run_id_N = runs_of(rows_N)
  _, _, run_rows_U = run_layout(rows_N, num_slots)
  contrib_NxD = (w_BxL.reshape(-1)[order_N].astype(jnp.float32)[:, None]
                 * jnp.take(dout_BxD.astype(jnp.float32), order_N // bag, axis=0))
  grads = jax.ops.segment_sum(contrib_NxD, run_id_N, num_segments=n, indices_are_sorted=True)
  return run_rows_U, grads


def distinct_rows(rows_N, num_slots: int, multiple: int = 1):
  """Numbers the distinct values of ``rows_N`` (ints in [0, num_slots]) in ascending order.

  Returns ``(segment [N], rows [S])`` with S = min(N, num_slots + 1), the most distinct values there
  can be, rounded up to a multiple of ``multiple``: ``rows[segment[i]] == rows_N[i]``; ``rows`` is
  ascending, then padding ``num_slots``.

  Example:
    >>> segment, rows = distinct_rows(jnp.array([7, 3, 7, 9]), 9)
    >>> segment.tolist(), rows.tolist()
    ([1, 0, 1, 2], [3, 7, 9, 9])
  """
  n = rows_N.shape[0]
  size = -(-min(n, num_slots + 1) // multiple) * multiple
  order_N, sorted_N = sort_lookups(rows_N.astype(jnp.int32))
  _, run_id_N = runs_of(sorted_N)  # < size: one per distinct value
  segment = jnp.zeros((n,), jnp.int32).at[order_N].set(run_id_N, unique_indices=True)
  rows = jnp.full((size,), num_slots, jnp.int32).at[run_id_N].set(sorted_N)
  return segment, rows


# ----- backend ``xla``: the reference -----------------------------------------------------------------


def forward(values_MxD, idx_BxL, w_BxL):
  """out [B, Dv] = sum_l w[:, l] * values[idx[:, l]] (gathers [B, L, Dv] at once), fp32."""
  rows_BxLxD = jnp.take(values_MxD, idx_BxL, axis=0)
  return jnp.einsum("bl,bld->bd", w_BxL.astype(jnp.float32), rows_BxLxD.astype(jnp.float32))


def backward(values_MxD, idx_BxL, w_BxL, dout_BxD):
  """(d_values [M, Dv] by a dense scatter-add, d_weights [B, L]), fp32."""
  dout_BxD = dout_BxD.astype(jnp.float32)
  rows_BxLxD = jnp.take(values_MxD, idx_BxL, axis=0).astype(jnp.float32)
  dw_BxL = jnp.einsum("bd,bld->bl", dout_BxD, rows_BxLxD)
  contrib_BxLxD = w_BxL.astype(jnp.float32)[:, :, None] * dout_BxD[:, None, :]
  dv_MxD = jnp.zeros(values_MxD.shape, jnp.float32).at[idx_BxL].add(contrib_BxLxD)
  return dv_MxD, dw_BxL


# ----- backend ``xla_loop``: CPU-friendly XLA ------------------------------------------------------------


def loop_forward(values, idx_BxL, w_BxL):
  """out = sum_l w[:, l] * values[idx[:, l]], one gather of B rows per step: no [B, L, Dv] buffer."""
  b, d = idx_BxL.shape[0], values.shape[1]
  w_LxB = w_BxL.astype(jnp.float32).T

  def step(l, acc_BxD):
    rows_BxD = jnp.take(values, idx_BxL[:, l], axis=0).astype(jnp.float32)
    return acc_BxD + w_LxB[l][:, None] * rows_BxD

  return lax.fori_loop(0, idx_BxL.shape[1], step, jnp.zeros((b, d), jnp.float32))


def loop_weight_grad(values, idx_BxL, dout_BxD):
  """dw [B, L] = <d_out[b], values[idx[b, l]]>, one gather of B rows per step."""
  dout_BxD = dout_BxD.astype(jnp.float32)

  def step(carry, idx_B):
    return carry, jnp.einsum("bd,bd->b", dout_BxD, jnp.take(values, idx_B, axis=0).astype(jnp.float32))

  _, dw_LxB = lax.scan(step, None, idx_BxL.T)
  return dw_LxB.T


def loop_backward(values, idx_BxL, w_BxL, dout_BxD):
  """(d_values, d_weights) with the value gradient from ``sorted_row_grads`` (no dense scatter-add)."""
  dw = loop_weight_grad(values, idx_BxL, dout_BxD)
  rows, grads = sorted_row_grads(idx_BxL, w_BxL, dout_BxD, values.shape[0])
  dv = jnp.zeros(values.shape, values.dtype).at[rows].set(grads.astype(values.dtype), mode="drop",
                                                          unique_indices=True)
  return dv, dw
