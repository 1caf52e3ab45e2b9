"""Optimizers: AdamW for the model, and the value tables in their own group, dense or row-sparse.

This module owns the whole value optimizer: the dense optax chain, and the row-sparse Adam on one
device and on a mesh (``sparse_value_update``: row gradients, clip, Adam; under ``jax.shard_map``
per shard, merged over the batch axes, in chunks of rows).

Two parameter groups (memory-layers.md §2):
  rest    every parameter but the value tables: clip by global norm ``train.clip``, AdamW at
          ``train.lr`` (warmup then decay), weight decay ``train.weight_decay`` on matrices only
          (norm scales, biases and qk-norm gains are not decayed).
  values  the value tables (``MemoryValue`` variables): own clip ``train.value_clip``, own learning
          rate ``train.value_learning_rate`` (default 10x ``lr``) on the same warmup/decay shape,
          own weight decay ``train.value_weight_decay``.

``config.model.memory.value_update``:
  dense   the dense gradient [M, Dv] and optax AdamW over the whole table, as the paper's code does:
          every step reads and writes all M rows of the table and both moments.
  sparse  row-sparse ("lazy") Adam, ``sparse_adam_update``. The step's gradient arrives as
          (rows, row gradients) from ``embedding_bag_row_grads``; for the rows R read this step,
          with t the global step (1-based) and g the row gradients after clipping by their global
          norm:
              m_R <- b1 m_R + (1 - b1) g           v_R <- b2 v_R + (1 - b2) g^2
              V_R <- V_R - lr_t ((m_R / (1 - b1^t)) / (sqrt(v_R / (1 - b2^t)) + eps) + wd V_R)
          Rows not read this step keep their values AND their moments: no decay of m or v, no
          weight decay, no momentum-driven drift (unlike dense AdamW, where a row's momentum keeps
          moving it after its last read). A read row whose summed gradient is zero still has its
          moments decayed. Bias correction uses the global step, as TF's LazyAdam does. The update
          costs O(rows * Dv): nothing of size [M, Dv] is created besides the table and its moments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memjax.config import TrainConfig
from memjax.kernels import cpu
from memjax.kernels.embedding_bag import embedding_bag_row_grads
from memjax.kernels.xla import distinct_rows
from memjax.sharding import SparseUpdateSpecs

UPDATE_CHUNK_ROWS = 1 << 16  # default rows per step of the sharded sparse Adam loop


def lr_schedule(peak: float, cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``peak`` over ``warmup_steps``, then linear/cosine decay to
  ``final_lr_frac * peak`` at ``steps`` (or constant)."""
  warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
  decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
  final = peak * cfg.final_lr_frac
  if cfg.decay == "linear":
    decay = optax.linear_schedule(peak, final, decay_steps)
  elif cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_frac)
  else:
    decay = optax.constant_schedule(peak)
  if cfg.warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
  """True for parameters that get weight decay: arrays with ndim >= 2 (matrices, embeddings)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_model_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """The ``rest`` group: clip, then AdamW with the warmup/decay schedule."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg.lr, cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))


def make_dense_value_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """The ``values`` group with ``value_update="dense"``: own clip, learning rate and decay."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.value_clip) if cfg.value_clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg.value_learning_rate, cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.value_weight_decay))


# ----- row-sparse Adam ---------------------------------------------------------------------------


class SparseAdamState(NamedTuple):
  """Moments of one value table (fp32, [M, Dv] each) and the number of updates applied."""

  mu: jax.Array
  nu: jax.Array
  count: jax.Array  # int32 scalar


def sparse_adam_init(values_MxD) -> SparseAdamState:
  return SparseAdamState(jnp.zeros(values_MxD.shape, jnp.float32), jnp.zeros(values_MxD.shape, jnp.float32),
                         jnp.zeros((), jnp.int32))


def clip_rows(grads_UxD, max_norm: float):
  """Scales the row gradients by min(1, max_norm / global norm); returns (grads, norm before)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(grads_UxD.astype(jnp.float32))))
  if max_norm <= 0:
    return grads_UxD, norm
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return grads_UxD * scale, norm


def sparse_adam_update(values_MxD, state: SparseAdamState, rows_U, grads_UxD, lr, *, b1: float, b2: float,
                       eps: float, weight_decay: float = 0.0):
  """One row-sparse AdamW step on the rows ``rows_U`` (distinct; entries >= M are padding, ignored).

  ``grads_UxD`` should already be clipped (``clip_rows``). Returns ``(values, state)``; see the
  module docstring for the semantics. Work and memory are O(U * Dv).

  Example:
    >>> v = jnp.ones((4, 2)); st = sparse_adam_init(v)
    >>> v2, st2 = sparse_adam_update(v, st, jnp.array([1, 4]), jnp.ones((2, 2)), 0.1, b1=0.9, b2=0.99, eps=1e-8)
    >>> [round(x, 4) for x in v2[:, 0].tolist()]  # only row 1 moved (by lr: Adam's first step is sign-like)
    [1.0, 0.9, 1.0, 1.0]
  """
  t = state.count + 1
  g = grads_UxD.astype(jnp.float32)
  m_rows = values_MxD.shape[0]
  # Padding entries (>= M) become distinct out-of-range rows so the scatters may assume uniqueness.
  rows_U = jnp.where(rows_U >= m_rows, m_rows + jnp.arange(rows_U.shape[0], dtype=rows_U.dtype), rows_U)
  m_old = state.mu.at[rows_U].get(mode="fill", fill_value=0.0)
  v_old = state.nu.at[rows_U].get(mode="fill", fill_value=0.0)
  p_old = values_MxD.at[rows_U].get(mode="fill", fill_value=0).astype(jnp.float32)
  m_new = b1 * m_old + (1.0 - b1) * g
  v_new = b2 * v_old + (1.0 - b2) * g * g
  tf = t.astype(jnp.float32)
  m_hat = m_new / (1.0 - b1**tf)
  v_hat = v_new / (1.0 - b2**tf)
  p_new = p_old - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * p_old)
  values = values_MxD.at[rows_U].set(p_new.astype(values_MxD.dtype), mode="drop", unique_indices=True)
  mu = state.mu.at[rows_U].set(m_new, mode="drop", unique_indices=True)
  nu = state.nu.at[rows_U].set(v_new, mode="drop", unique_indices=True)
  return values, SparseAdamState(mu, nu, t)


def chunked_sparse_adam_update(values, state: SparseAdamState, rows_U, grads_UxD, lr, scale, *,
                               chunk_rows: int, **adam):
  """``sparse_adam_update(values, state, rows, scale * grads, lr)`` in a loop over chunks of
  ``chunk_rows`` rows (U must be a multiple of it; rows distinct, padding >= M): the gathered rows,
  moments and their new values exist for one chunk at a time, not for all U rows."""
  u = rows_U.shape[0]
  if u <= chunk_rows:
    return sparse_adam_update(values, state, rows_U, grads_UxD * scale, lr, **adam)

  def body(i, carry):
    table, mu, nu = carry
    rows = jax.lax.dynamic_slice_in_dim(rows_U, i * chunk_rows, chunk_rows)
    grads = jax.lax.dynamic_slice_in_dim(grads_UxD, i * chunk_rows, chunk_rows) * scale
    table, new = sparse_adam_update(table, SparseAdamState(mu, nu, state.count), rows, grads, lr, **adam)
    return table, new.mu, new.nu

  table, mu, nu = jax.lax.fori_loop(0, u // chunk_rows, body, (values, state.mu, state.nu))
  return table, SparseAdamState(mu, nu, state.count + 1)


def _one_device_sparse_update(table, opt: SparseAdamState, idx, wts, dys, lr, *, clip: float, backend: str,
                              **adam):
  """``sparse_value_update`` on one device in XLA: row gradients of the whole batch
  (``embedding_bag_row_grads`` with ``backend``), the clip, Adam on every row read."""
  rows, row_grads = embedding_bag_row_grads(idx, wts, dys, table.shape[0], backend=backend)
  # rows holds the U <= M distinct rows first, then padding: with more lookups than slots (N > M)
  # its first M entries are all of it, and Adam touches M rows instead of N (knowledge sweep:
  # N = 393k lookups on a 65k-slot table).
  keep = min(rows.shape[0], table.shape[0])
  rows, row_grads = rows[:keep], row_grads[:keep]
  row_grads, norm = clip_rows(row_grads, clip)
  table, opt = sparse_adam_update(table, opt, rows, row_grads, lr, **adam)
  return table, opt, norm**2


def sparse_value_update(specs: SparseUpdateSpecs | None, table, opt: SparseAdamState, idx, wts, dys, lr, *,
                        clip: float, b1: float, b2: float, eps: float, weight_decay: float,
                        chunk_rows: int = UPDATE_CHUNK_ROWS, backend: str = "auto", fused: bool = True):
  """The row-sparse update of one value pool: row gradients, global-norm clip, row-sparse Adam.

  ``idx``/``wts`` [R, B, T, H*k] are the lookups of the pool's R readers, ``dys`` [R, B, T, Dv] the
  cotangents of their reads. ``specs`` (``sharding.sparse_update_specs``) None means one device:
  the row gradients of the whole batch (``embedding_bag_row_grads`` with ``backend``), then Adam on
  every row read; with ``fused`` and ``backend="auto"``, where lowered for CPU, the fused kernels
  (``cpu.value_row_sums``, ``cpu.value_adam``: a counting sort instead of the row gradients' radix
  sort, Adam in one pass). Otherwise ``sharded_sparse_value_update``. Returns (table, opt, squared
  norm of the row gradients before clipping).
  """
  adam = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if specs is None and fused and backend == "auto" and fused_update_available(table):
    # Lowered for CPU: the fused kernels (one pass over the lookups, one over the table); elsewhere
    # the XLA formulation below. Both compute the same update (tests/test_fused_update.py).
    def on_cpu(table, mu, nu, count, idx, wts, dys, lr):
      rows, g, sq = cpu.value_row_sums(idx, wts, dys, table.shape[0])
      norm = jnp.sqrt(sq)
      scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30)) if clip > 0 else jnp.ones(())
      t = count + 1
      tf = t.astype(jnp.float32)
      # In place when the step reads fewer rows than the table has (step.py then reads it with XLA's
      # gather, so XLA keeps no copy of the table for the readers' kernels).
      table, mu, nu = cpu.value_adam(table, mu, nu, rows, g, lr=lr, div=1.0, mul=scale, bc1=1.0 - b1**tf,
                                     bc2=1.0 - b2**tf, lazy=True, table_in_place=idx.size < table.shape[0],
                                     **adam)
      return table, mu, nu, t, sq

    def elsewhere(table, mu, nu, count, idx, wts, dys, lr):
      table, new, sq = _one_device_sparse_update(table, SparseAdamState(mu, nu, count), idx, wts, dys, lr,
                                                 clip=clip, backend=backend, **adam)
      return table, new.mu, new.nu, new.count, sq

    table, mu, nu, count, sq = jax.lax.platform_dependent(table, opt.mu, opt.nu, opt.count, idx, wts, dys, lr,
                                                          cpu=on_cpu, default=elsewhere)
    return table, SparseAdamState(mu, nu, count), sq
  if specs is None:
    return _one_device_sparse_update(table, opt, idx, wts, dys, lr, clip=clip, backend=backend, **adam)
  return sharded_sparse_value_update(specs, table, opt, idx, wts, dys, lr, clip=clip, chunk_rows=chunk_rows,
                                     backend=backend, **adam)


def fused_update_available(table) -> bool:
  """Whether the fused CPU value update (``cpu.value_row_sums`` + ``cpu.value_adam``) can take this
  table: fp32, int32-addressable, and the C++ kernels built. The caller also needs one device."""
  return table.dtype == jnp.float32 and table.shape[0] < 2**31 and cpu.ffi_status()[0]


def fused_dense_value_update(tables: dict, taps: dict, opt_state, cfg: TrainConfig, lr_fn):
  """The dense value update (``make_dense_value_tx``: clip by the global norm over every table, then
  AdamW on every row) from the reads' taps, by the fused CPU kernels. Equal to running the optax
  chain on the dense gradient: same formulas term for term, the optax state read and written in
  its own structure (within fp32 rounding of the gradient's summation order).

  Args:
    tables: ``{pool key: table [M, Dv] fp32}``.
    taps: ``{pool key: (idx, weights, d_reads)}`` of the pool's readers (``PoolTaps``).
    opt_state: the optax state of ``make_dense_value_tx(cfg)`` for the values State ``tables`` came from.
    cfg: the train config (b1, b2, eps, value_clip, value_weight_decay).
    lr_fn: the value learning-rate schedule (evaluated at the schedule's count, as optax does).
  Returns:
    ``(new tables, moments, count, norm)``: ``{pool key: table}``, ``{pool key: (mu, nu)}``, Adam's
    new count and the global gradient norm before clipping; ``with_dense_moments(opt_state, moments,
    count)`` is the new optax state.
  """
  sums = {key: cpu.value_row_sums(*taps[key], tables[key].shape[0]) for key in tables}
  norm = jnp.sqrt(sum(sq for _, _, sq in sums.values()))
  if cfg.value_clip > 0:  # optax.clip_by_global_norm: t unchanged below the bound, else (t / norm) * bound
    below = norm < cfg.value_clip
    div, mul = jnp.where(below, 1.0, norm), jnp.where(below, 1.0, cfg.value_clip)
  else:
    div, mul = jnp.ones(()), jnp.ones(())
  adam, schedule = _dense_counts(opt_state)
  count = optax.safe_increment(adam.count)
  bc1, bc2 = 1 - cfg.b1**count, 1 - cfg.b2**count  # as optax's bias correction computes them
  lr = lr_fn(schedule.count)
  new_tables, moments = {}, {}
  for key, (rows, g, _) in sums.items():
    mu, nu = adam_moments(adam, key)
    new_tables[key], mu, nu = cpu.value_adam(tables[key], mu, nu, rows, g, lr=lr, div=div, mul=mul, bc1=bc1,
                                             bc2=bc2, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                             weight_decay=cfg.value_weight_decay, lazy=False)
    moments[key] = (mu, nu)
  return new_tables, moments, count, norm


def _dense_counts(opt_state):
  """The ``ScaleByAdamState`` and ``ScaleByScheduleState`` inside the dense value optimizer's state."""
  found = {}
  is_leaf = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
  for x in jax.tree.leaves(opt_state, is_leaf=is_leaf):
    if is_leaf(x):
      found[type(x)] = x
  return found[optax.ScaleByAdamState], found[optax.ScaleByScheduleState]


def adam_moments(adam: optax.ScaleByAdamState, key):
  """``(mu, nu)`` arrays of the table at flat path ``key`` (a tuple) in a dense Adam state."""
  get = lambda tree: dict((tuple(p), v) for p, v in nnx.to_flat_state(tree))[key][...]
  return get(adam.mu), get(adam.nu)


def with_dense_moments(opt_state, moments: dict, count):
  """The dense value optimizer's state after a step: Adam's count and moments replaced (``moments``:
  ``{flat path: (mu, nu)}``), the schedule's count incremented; the rest (clip, decay) unchanged."""

  def put(tree, which):
    flat = {tuple(p): v for p, v in nnx.to_flat_state(tree)}
    for key, pair in moments.items():
      flat[key] = flat[key].replace(pair[which])
    return nnx.from_flat_state(flat)

  def rebuild(x):
    if isinstance(x, optax.ScaleByAdamState):
      return optax.ScaleByAdamState(count=count, mu=put(x.mu, 0), nu=put(x.nu, 1))
    if isinstance(x, optax.ScaleByScheduleState):
      return optax.ScaleByScheduleState(count=optax.safe_increment(x.count))
    return x

  return jax.tree.map(rebuild, opt_state,
                      is_leaf=lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))


def sharded_sparse_value_update(specs: SparseUpdateSpecs, table, opt: SparseAdamState, idx, wts, dys, lr, *,
                                clip: float, b1: float, b2: float, eps: float, weight_decay: float,
                                chunk_rows: int = UPDATE_CHUNK_ROWS, backend: str = "auto"):
  """The row-sparse value update of one pool, computed per shard under ``jax.shard_map``.

  The row-gradient kernel is opaque to GSPMD, which would run it on every device over the whole
  batch's lookups. Here each device:
    1. takes its batch shard's lookups ``idx``/``wts`` [R, b, T, H*k] and tap cotangent ``dys``
       [R, b, T, Dv_l] (column mode: its Dv/m columns; row mode: all columns, and the lookups of
       rows other devices own go to a padding row with weight 0);
    2. computes its local (rows [N_l], row gradients [N_l, Dv_l]) with the kernel;
    3. merges them over the batch axes (data, fsdp): all-gathers the row ids only (ints), numbers
       the distinct rows of the global batch (``distinct_rows``; there are at most
       S = min(N_global, table rows + 1) of them), scatter-adds its gradients into its rows' slots
       of an [S, Dv_l] buffer and ``psum``s the buffer over the batch axes. Every device of a
       memory group then holds the same summed gradient of every row of its table shard that the
       global batch read. The buffer is bounded by the table shard's rows as well as by the lookups;
    4. clips by the global norm: squares summed locally and ``psum``-ed over the table's axes only
       (column: the same rows' other columns; row: other rows), not over the batch axes, whose
       devices hold copies after the merge;
    5. applies ``sparse_adam_update`` to its table shard and moment shards, in place, in a loop
       over chunks of at most ``chunk_rows`` rows (``chunked_sparse_adam_update``), so the
       gathered rows, moments and their new values exist for one chunk at a time.
  The table, its moments and the gradient are never gathered. Returns (table, opt, squared norm).
  """
  P = jax.sharding.PartitionSpec
  lookup_spec = P(None, specs.batch, None, None)
  batch_axes, table_axes, row_axis = specs.batch_axes, specs.table_axes, specs.row_axis
  adam = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  def local(idx, wts, dys, table, mu, nu, count, lr):
    slots = table.shape[0]
    if row_axis is not None:  # row mode: this device's rows are [offset, offset + slots)
      local_idx = idx - jax.lax.axis_index(row_axis) * slots
      mine = (local_idx >= 0) & (local_idx < slots)
      idx, wts = jnp.where(mine, local_idx, slots), jnp.where(mine, wts, 0.0)
      slots_in = slots + 1  # row ``slots`` collects the masked lookups: padding for the update
    else:
      slots_in = slots
    rows, grads = embedding_bag_row_grads(idx, wts, dys, slots_in, backend=backend)  # [N_l], [N_l, Dv_l]
    chunk = rows.shape[0]
    if batch_axes:
      n_local = rows.shape[0]
      all_rows = jax.lax.all_gather(rows, batch_axes, tiled=True)  # [N_global] ints
      bound = min(all_rows.shape[0], slots_in + 1)  # distinct rows the global batch can read
      chunk = -(-bound // -(-bound // chunk_rows))  # equal chunks of <= chunk_rows
      segment, rows = distinct_rows(all_rows, slots_in, chunk)
      mine = jax.lax.dynamic_slice_in_dim(segment, jax.lax.axis_index(batch_axes) * n_local, n_local)
      merged = jnp.zeros((rows.shape[0], grads.shape[1]), jnp.float32).at[mine].add(grads)
      grads = jax.lax.psum(merged, batch_axes)
    sq = jnp.sum(jnp.square(grads))
    if table_axes:
      sq = jax.lax.psum(sq, table_axes)
    norm = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30)) if clip > 0 else 1.0
    table, new = chunked_sparse_adam_update(table, SparseAdamState(mu, nu, count), rows, grads, lr, scale,
                                            chunk_rows=chunk, **adam)
    return table, new.mu, new.nu, new.count, sq

  table, mu, nu, count, sq = jax.shard_map(
      local, in_specs=(lookup_spec, lookup_spec, P(None, specs.batch, None, specs.dys_last), specs.table,
                       specs.table, specs.table, P(), P()),
      out_specs=(specs.table, specs.table, specs.table, P(), P()), check_vma=False)(
          idx, wts, dys, table, opt.mu, opt.nu, opt.count, lr)
  return table, SparseAdamState(mu, nu, count), sq
