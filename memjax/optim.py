"""Optimizers: AdamW for the model, and the value table in its own group, dense or row-sparse.

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

from memjax.config import TrainConfig


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
