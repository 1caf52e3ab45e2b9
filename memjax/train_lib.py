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

  def grads(state, batch):
    """Loss, aux and gradients. The value gradient is dense (a State like ``values``) in dense
    mode, and ``{pool key: (rows [U], row_grads [U, Dv])}`` in sparse mode."""
    params, values = state["params"], state["values"]
    b, t = batch["inputs"].shape
    if not sparse:
      (loss, aux), (g_params, g_values) = jax.value_and_grad(
          lambda p, v: forward(p, v, batch, None), argnums=(0, 1), has_aux=True)(params, values)
      return loss, aux, g_params, g_values
    dv = model_cfg.memory.layer.value_dim
    taps = [jnp.zeros((b, t, dv), jnp.float32) for _ in abstract.memory_blocks]
    (loss, aux), (g_params, g_taps) = jax.value_and_grad(
        lambda p, tp: forward(p, values, batch, tp), argnums=(0, 1), has_aux=True)(params, taps)
    lookups = aux[3]
    g_values = {}
    for path, readers in pools:
      # All lookups of the memory blocks reading this pool: [R, B, T, H*k] and [R, B, T, Dv].
      idx = jnp.stack([lookups[j][0].reshape(b, t, -1) for j in readers])
      wts = jnp.stack([lookups[j][1].reshape(b, t, -1) for j in readers])
      dys = jnp.stack([g_taps[j] for j in readers])
      g_values["/".join(map(str, path))] = embedding_bag_row_grads(idx, wts, dys, num_slots)
    return loss, aux, g_params, g_values

  def train_step(state, batch):
    params, values = state["params"], state["values"]
    loss, (ce, moe_loss, count, _), g_params, g_values = grads(state, batch)
    grad_norm = optax.tree.norm(g_params)
    step = state["step"]

    if sparse:
      new_value_opt, sq_norm = dict(state["value_opt"]), 0.0
      flat = _flat_values(values)
      for path, _ in pools:
        key = "/".join(map(str, path))
        rows, row_grads = g_values[key]
        row_grads, norm = clip_rows(row_grads, train_cfg.value_clip)
        sq_norm = sq_norm + norm**2
        table, opt = sparse_adam_update(
            flat[path][...], state["value_opt"][key], rows, row_grads, value_lr(step),
            b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.value_weight_decay)
        flat[path] = flat[path].replace(table)
        new_value_opt[key] = opt
      new_values = nnx.from_flat_state(flat)
      value_grad_norm = jnp.sqrt(sq_norm)
    else:
      value_grad_norm = optax.tree.norm(g_values)
      updates, new_value_opt = value_tx.update(g_values, state["value_opt"], values)
      new_values = optax.apply_updates(values, updates)

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
