"""Pure train and eval steps, sharded state creation: everything ``train.py`` runs, importable.

The train state is a dict pytree:
  step       int32 []                       steps applied
  params     nnx.State                      every parameter but the value tables
  values     nnx.State                      the value tables (``MemoryValue``), one per pool
  opt        optax state for ``params``
  value_opt  optax state (dense) or ``{pool path: SparseAdamState}`` (sparse) for ``values``

``make_train_step`` returns one pure ``step(state, batch) -> (state, metrics)``; ``Trainer`` jits
it once with explicit in/out shardings and donates the state. Batches follow the data contract:
``{"inputs", "targets", "loss_mask", "segment_ids", "positions"}``, each [B, T].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memjax import sharding
from memjax.config import ModelConfig, TrainConfig
from memjax.kernels.embedding_bag import embedding_bag_row_grads
from memjax.memory.layer import MemoryValue
from memjax.model import LM
from memjax.optim import (SparseAdamState, clip_rows, lr_schedule, make_dense_value_tx, make_model_tx,
                          sparse_adam_init, sparse_adam_update)

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def split_model(model: LM):
  """(graphdef, params, values): the value tables apart from every other parameter."""
  graphdef, values, params = nnx.split(model, MemoryValue, nnx.Param)
  return graphdef, params, values


def value_pools(model: LM) -> list[tuple[tuple, list[int]]]:
  """For each value table: (its path in ``values``, the positions among memory blocks that read it)."""
  pools: dict[int, tuple[tuple, list[int]]] = {}
  paths = {id(v): path for path, v in nnx.iter_graph(model) if isinstance(v, MemoryValue)}
  for j, i in enumerate(model.memory_blocks):
    var = model.blocks[i].ffn.values.values
    entry = pools.setdefault(id(var), (tuple(paths[id(var)]), []))
    entry[1].append(j)
  return list(pools.values())


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """(mean masked token cross-entropy, number of tokens counted)."""
  logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask = mask_BxT.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum((logz - picked) * mask) / jnp.maximum(count, 1.0), count


def _get(state: nnx.State, path: tuple):
  node = state
  for key in path:
    node = node[key]
  return node


def _flat_values(values: nnx.State) -> dict:
  return {tuple(p): v for p, v in nnx.to_flat_state(values)}


@dataclasses.dataclass(frozen=True)
class StepFns:
  """What ``make_train_step`` builds: the model's graph, pools, optimizers and the pure steps."""

  graphdef: Any
  pools: list
  model_tx: optax.GradientTransformation
  value_tx: optax.GradientTransformation | None
  init: Any  # rng seed -> state
  grads: Any  # (state, batch) -> (loss, aux, param grads, value grads)
  train_step: Any  # (state, batch) -> (state, metrics)
  eval_step: Any  # (state, batch) -> metrics with the lookups


def make_step_fns(model_cfg: ModelConfig, train_cfg: TrainConfig, *, backend: str = "auto") -> StepFns:
  """Builds the pure init / train / eval functions for one model and optimizer configuration."""
  sparse = model_cfg.memory.value_update == "sparse"
  num_slots = model_cfg.memory.layer.num_slots
  if sparse and backend == "auto":
    # The sparse step updates the donated table in place. An opaque kernel (custom call) that reads
    # the table makes XLA copy the whole table first (O(slots) per step, measured); XLA's own
    # gather does not. So sparse steps read the table with the "xla" backend unless told otherwise.
    backend = "xla"
  model_tx = make_model_tx(train_cfg)
  value_tx = None if sparse else make_dense_value_tx(train_cfg)
  value_lr = lr_schedule(train_cfg.value_learning_rate, train_cfg)
  model_lr = lr_schedule(train_cfg.lr, train_cfg)

  abstract = nnx.eval_shape(lambda: LM(model_cfg, backend=backend, rngs=nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract)
  pools = value_pools(abstract)

  def init(seed):
    model = LM(model_cfg, backend=backend, rngs=nnx.Rngs(jax.random.key(seed)))
    _, params, values = split_model(model)
    if sparse:
      value_opt = {"/".join(map(str, p)): sparse_adam_init(_get(values, p)[...]) for p, _ in pools}
    else:
      value_opt = value_tx.init(values)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "values": values,
            "opt": model_tx.init(params), "value_opt": value_opt}

  def forward(params, values, batch, taps):
    model = nnx.merge(graphdef, values, params)
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], value_taps=taps)
    ce, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    lookups = [(r.indices, r.weights) for r in aux["memory"]]
    return ce + aux["moe_loss"], (ce, aux["moe_loss"], count, lookups)

  def sparse_taps(state, batch):
    """Loss, aux, param grads and, per pool, the inputs of its row gradients: ``{pool key: (idx
    [R, B, T, H*k], weights [R, B, T, H*k], tap cotangents [R, B, T, Dv])}`` over its R readers."""
    params, values = state["params"], state["values"]
    b, t = batch["inputs"].shape
    dv = model_cfg.memory.layer.value_dim
    taps = [jnp.zeros((b, t, dv), jnp.float32) for _ in abstract.memory_blocks]
    (loss, aux), (g_params, g_taps) = jax.value_and_grad(
        lambda p, tp: forward(p, values, batch, tp), argnums=(0, 1), has_aux=True)(params, taps)
    lookups = aux[3]
    inputs = {}
    for path, readers in pools:
      idx = jnp.stack([lookups[j][0].reshape(b, t, -1) for j in readers])
      wts = jnp.stack([lookups[j][1].reshape(b, t, -1) for j in readers])
      dys = jnp.stack([g_taps[j] for j in readers])
      inputs["/".join(map(str, path))] = (idx, wts, dys)
    return loss, aux, g_params, inputs

  def grads(state, batch):
    """Loss, aux and gradients. The value gradient is dense (a State like ``values``) in dense
    mode, and ``{pool key: (rows [U], row_grads [U, Dv])}`` in sparse mode (over the whole batch:
    the train step under a mesh computes them per shard instead, ``sharded_sparse_value_update``)."""
    params, values = state["params"], state["values"]
    if not sparse:
      (loss, aux), (g_params, g_values) = jax.value_and_grad(
          lambda p, v: forward(p, v, batch, None), argnums=(0, 1), has_aux=True)(params, values)
      return loss, aux, g_params, g_values
    loss, aux, g_params, inputs = sparse_taps(state, batch)
    g_values = {key: embedding_bag_row_grads(*inp, num_slots) for key, inp in inputs.items()}
    return loss, aux, g_params, g_values

  adam = dict(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.value_weight_decay)

  def train_step(state, batch):
    params, values = state["params"], state["values"]
    step = state["step"]
    if sparse:
      loss, (ce, moe_loss, count, _), g_params, inputs = sparse_taps(state, batch)
      new_value_opt, sq_norm = dict(state["value_opt"]), 0.0
      flat = _flat_values(values)
      for path, _ in pools:
        key = "/".join(map(str, path))
        table, opt = flat[path][...], state["value_opt"][key]
        specs = sharding.sparse_update_specs(model_cfg.memory.value_sharding, batch["inputs"].shape[0],
                                             table.shape)
        if specs is None:  # one device: row gradients over the whole batch, as ``grads`` returns them
          rows, row_grads = embedding_bag_row_grads(*inputs[key], num_slots)
          row_grads, norm = clip_rows(row_grads, train_cfg.value_clip)
          table, opt = sparse_adam_update(table, opt, rows, row_grads, value_lr(step), **adam)
          sq = norm**2
        else:
          table, opt, sq = sharded_sparse_value_update(
              specs, table, opt, *inputs[key], value_lr(step), clip=train_cfg.value_clip, **adam)
        sq_norm = sq_norm + sq
        flat[path] = flat[path].replace(table)
        new_value_opt[key] = opt
      new_values = nnx.from_flat_state(flat)
      value_grad_norm = jnp.sqrt(sq_norm)
    else:
      loss, (ce, moe_loss, count, _), g_params, g_values = grads(state, batch)
      value_grad_norm = optax.tree.norm(g_values)
      updates, new_value_opt = value_tx.update(g_values, state["value_opt"], values)
      new_values = optax.apply_updates(values, updates)
    grad_norm = optax.tree.norm(g_params)

    updates, new_opt = model_tx.update(g_params, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(value_grad_norm)
    new_state = {"step": step + 1, "params": new_params, "values": new_values, "opt": new_opt,
                 "value_opt": new_value_opt}
    if train_cfg.nan_policy == "skip":
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {"step": step + 1, **{k: keep(new_state[k], state[k]) for k in
                                          ("params", "values", "opt", "value_opt")}}
    metrics = {"loss": loss, "ce": ce, "moe_loss": moe_loss, "grad_norm": grad_norm,
               "value_grad_norm": value_grad_norm, "lr": model_lr(step), "value_lr": value_lr(step),
               "tokens": count, "finite": finite}
    return new_state, metrics

  def eval_step(state, batch):
    _, (ce, _, count, lookups) = forward(state["params"], state["values"], batch, None)
    return {"ce": ce, "tokens": count, "lookups": lookups}

  return StepFns(graphdef, pools, model_tx, value_tx, init, grads, train_step, eval_step)


# ----- the row-sparse value update under a mesh ----------------------------------------------------


UPDATE_CHUNK_ROWS = 1 << 16  # rows per step of the sharded sparse Adam loop


def distinct_rows(rows_N, num_slots: int, multiple: int = 1):
  """Numbers the distinct values of ``rows_N`` (ints in [0, num_slots]) in ascending order.

  Returns ``(segment [N], rows [S])`` with S = min(N, num_slots + 1), the most distinct values there
  can be, rounded up to a multiple of ``multiple``: ``rows[segment[i]] == rows_N[i]``; ``rows`` is
  ascending, then padding ``num_slots``."""
  n = rows_N.shape[0]
  size = -(-min(n, num_slots + 1) // multiple) * multiple
  order = jnp.argsort(rows_N, stable=True)
  sorted_rows = rows_N[order]
  starts = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
  segment_sorted = jnp.cumsum(starts.astype(jnp.int32)) - 1  # < size: one per distinct value
  segment = jnp.zeros((n,), jnp.int32).at[order].set(segment_sorted, unique_indices=True)
  rows = jnp.full((size,), num_slots, jnp.int32).at[segment_sorted].set(sorted_rows.astype(jnp.int32))
  return segment, rows


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


def sharded_sparse_value_update(specs, table, opt: SparseAdamState, idx, wts, dys, lr, *, clip: float,
                                b1: float, b2: float, eps: float, weight_decay: float):
  """The row-sparse value update of one pool, computed per shard under ``jax.shard_map``.

  ``specs`` from ``sharding.sparse_update_specs``. The row-gradient kernel is opaque to GSPMD,
  which would run it on every device over the whole batch's lookups. Here each device:
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
       over chunks of at most ``UPDATE_CHUNK_ROWS`` rows (``chunked_sparse_adam_update``), so the
       gathered rows, moments and their new values exist for one chunk at a time.
  The table, its moments and the gradient are never gathered. Returns (table, opt, squared norm).
  """
  batch_spec, table_spec, dys_last, batch_axes, table_axes, row_axis = specs
  P = jax.sharding.PartitionSpec
  lookup_spec = P(None, batch_spec, None, None)

  def local(idx, wts, dys, table, mu, nu, count, lr):
    slots = table.shape[0]
    if row_axis is not None:  # row mode: this device's rows are [offset, offset + slots)
      local_idx = idx - jax.lax.axis_index(row_axis) * slots
      mine = (local_idx >= 0) & (local_idx < slots)
      idx, wts = jnp.where(mine, local_idx, slots), jnp.where(mine, wts, 0.0)
      slots_in = slots + 1  # row ``slots`` collects the masked lookups: padding for the update
    else:
      slots_in = slots
    rows, grads = embedding_bag_row_grads(idx, wts, dys, slots_in)  # [N_l], [N_l, Dv_l]
    chunk = rows.shape[0]
    if batch_axes:
      n_local = rows.shape[0]
      all_rows = jax.lax.all_gather(rows, batch_axes, tiled=True)  # [N_global] ints
      bound = min(all_rows.shape[0], slots_in + 1)  # distinct rows the global batch can read
      chunk = -(-bound // -(-bound // UPDATE_CHUNK_ROWS))  # equal chunks of <= UPDATE_CHUNK_ROWS
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
                                            chunk_rows=chunk, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return table, new.mu, new.nu, new.count, sq

  table, mu, nu, count, sq = jax.shard_map(
      local, in_specs=(lookup_spec, lookup_spec, P(None, batch_spec, None, dys_last), table_spec, table_spec,
                       table_spec, P(), P()),
      out_specs=(table_spec, table_spec, table_spec, P(), P()), check_vma=False)(
          idx, wts, dys, table, opt.mu, opt.nu, opt.count, lr)
  return table, SparseAdamState(mu, nu, count), sq


# ----- sharding of the state ---------------------------------------------------------------------


def state_shardings(fns: StepFns, abstract_state, mesh: Mesh, rules: dict):
  """NamedShardings for every leaf of the train state: parameters by their logical axes, optimizer
  moments like their parameters, scalars replicated."""
  rep = NamedSharding(mesh, PartitionSpec())
  params_sh = sharding.state_shardings(abstract_state["params"], mesh, rules)
  values_sh = sharding.state_shardings(abstract_state["values"], mesh, rules)

  def like_params(tx, opt_state, params_sharding):
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, params_sharding,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, (nnx.Variable, NamedSharding)))

  opt_sh = like_params(fns.model_tx, abstract_state["opt"], params_sh)
  if fns.value_tx is None:
    value_opt_sh = {}
    for path, _ in fns.pools:
      table_sh = _get(values_sh, path)
      value_opt_sh["/".join(map(str, path))] = SparseAdamState(table_sh, table_sh, rep)
  else:
    value_opt_sh = like_params(fns.value_tx, abstract_state["value_opt"], values_sh)
  return {"step": rep, "params": params_sh, "values": values_sh, "opt": opt_sh, "value_opt": value_opt_sh}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
