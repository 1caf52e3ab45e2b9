"""Lookups sorted by table row: the index layout the atomic-free value-gradient kernels read.

Shapes:
  idx_N       [N]      int32 table row of each lookup (N = B * L, flattened bags)
  order_N     [N]      lookup ids sorted by row (stable: ties keep lookup order)
  rows_N      [N]      idx_N[order_N], ascending
  run_start_N [N]      bool, True where a run of equal rows starts in rows_N
  run_off_U1  [N + 1]  start of run u in the sorted order, then N (U <= N runs; padding runs are empty)
  run_rows_U  [N]      the row of run u, then ``num_slots`` (padding)
  row_off_M1  [M + 1]  start of row r's lookups in the sorted order (CSR "reverse indices")

Every value-gradient kernel sums, for each run (or each table row), ``w[n] * d_out[n // L]`` over the
lookups n of that run in sorted order: deterministic, no atomics, no [M, Dv] scatter.
"""

from __future__ import annotations

import jax.numpy as jnp


def sort_lookups(idx_N):
  """Returns (order_N, rows_N): the lookups sorted by row, stably."""
  order_N = jnp.argsort(idx_N, stable=True).astype(jnp.int32)
  return order_N, idx_N[order_N]


def run_layout(rows_N, num_slots: int):
  """Returns (run_start_N, run_off_U1, run_rows_U) for ascending rows_N."""
  n = rows_N.shape[0]
  run_start_N = jnp.concatenate([jnp.ones((1,), bool), rows_N[1:] != rows_N[:-1]])
  run_id_N = jnp.cumsum(run_start_N.astype(jnp.int32)) - 1
  target_N = jnp.where(run_start_N, run_id_N, n)  # out of range for non-starts: dropped
  run_off_U1 = jnp.full((n + 1,), n, jnp.int32).at[target_N].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  run_rows_U = jnp.full((n,), num_slots, jnp.int32).at[target_N].set(rows_N.astype(jnp.int32), mode="drop")
  return run_start_N, run_off_U1, run_rows_U


def row_offsets(rows_N, num_slots: int):
  """CSR offsets [M + 1]: row r's lookups are sorted positions row_off[r] .. row_off[r + 1]."""
  return jnp.searchsorted(rows_N, jnp.arange(num_slots + 1, dtype=rows_N.dtype), side="left").astype(jnp.int32)
