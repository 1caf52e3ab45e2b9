"""Pure train and eval steps, the train state's shardings, and the one jit of the steps.

The train state is a dict pytree:
  step       int32 []                       steps applied
  params     nnx.State                      every parameter but the value tables
  values     nnx.State                      the value tables (``MemoryValue``), one per pool
  opt        optax state for ``params``
  value_opt  optax state (dense) or ``{pool key: SparseAdamState}`` (sparse) for ``values``
  stats      finetuning only (``config.finetune.method`` set): ``{pool key: df [M] float32}``, the
             background document frequencies of sparse memory finetuning (``{}`` for other methods)

With a finetuning method (``memjax.train.finetune``) ``opt`` is the finetune optimizer's state of the
parameters ("full") or empty ("memory", "smf": the parameters are frozen), and ``value_opt`` is
``{pool key: SparseAdamState}`` (adam) or ``{}`` (sgd); the value gradient is dense.

``make_step_fns`` returns the pure functions (``StepFns``); ``jit_steps`` jits them once for a mesh
with explicit in/out shardings and a donated state: the training loop, the ahead-of-time compile
helpers (``compile_train_step``) and the tests all use it. Batches follow the data contract
(``memjax.data.pipeline``): ``{"inputs", "targets", "loss_mask", "segment_ids", "positions"}``,
each [B, T].
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from memjax import sharding
from memjax.config import FinetuneConfig, ModelConfig, TrainConfig
from memjax.data.pipeline import BATCH_DTYPES
from memjax.kernels.embedding_bag import embedding_bag_row_grads
from memjax.model import LM, Pool, merge_model, split_model, value_pools
from memjax.optim import (UPDATE_CHUNK_ROWS, SparseAdamState, fused_dense_value_update, fused_update_available,
                          lr_schedule, make_dense_value_tx, make_model_tx, sparse_adam_init, sparse_value_update,
                          with_dense_moments)


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
  """(mean masked token cross-entropy, number of tokens counted)."""
  logz = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask = mask_BxT.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum((logz - picked) * mask) / jnp.maximum(count, 1.0), count


class LossAux(NamedTuple):
  """What the loss returns beside itself: cross-entropy, MoE balancing loss, tokens counted, each
  memory block's lookup ``(indices [B, T, H, k], weights [B, T, H, k])``, and each PEER block's
  ``(experts [B, T, H, k], gates [B, T, H, k])``."""

  ce: jax.Array
  moe_loss: jax.Array
  tokens: jax.Array
  lookups: list
  peer_lookups: tuple = ()


class PoolTaps(NamedTuple):
  """The inputs of one pool's row gradients over its R readers (``embedding_bag_row_grads``)."""

  idx: jax.Array  # [R, B, T, H*k] slots
  weights: jax.Array  # [R, B, T, H*k]
  d_reads: jax.Array  # [R, B, T, Dv] cotangents of the reads


def _get(state: nnx.State, path: tuple):
  node = state
  for key in path:
    node = node[key]
  return node


@dataclasses.dataclass(frozen=True)
class StepFns:
  """What ``make_step_fns`` builds: the model's graph and pools, the optimizers and the pure steps.

  sparse: the value tables are updated row-sparsely (``value_opt`` holds ``SparseAdamState``s and
  ``value_tx`` is None); otherwise ``value_tx`` is the dense optax chain. finetune: the finetuning
  method (``config.finetune.method``) or None; with one, ``value_tx`` is None and ``sparse`` False.
  """

  graphdef: Any
  pools: tuple[Pool, ...]
  sparse: bool
  model_tx: optax.GradientTransformation
  value_tx: optax.GradientTransformation | None
  init: Any  # rng seed -> state
  start: Any  # (params, values, stats) -> state with a fresh optimizer state
  grads: Any  # (state, batch) -> (loss, LossAux, param grads, value grads)
  train_step: Any  # (state, batch) -> (state, metrics)
  eval_step: Any  # (state, batch) -> {"ce", "tokens", "lookups", "peer_lookups" (not when finetuning)}
  logits: Any  # (state, tokens [B, T] int32) -> logits [B, T, V] fp32
  finetune: str | None = None
  merged_params: Any = None  # state -> the parameters to export ("lora": base + adapters); None: params
  # (state, batch) -> the forward + backward of the accumulation loop (all ``train.microbatches``), as
  # the train step runs it: with the sparse update the value gradient stays the reads' cotangents
  # (taps), before any row gradients (which the step under a mesh forms per shard). None: ``grads``.
  backward: Any = None


def make_step_fns(model_cfg: ModelConfig, train_cfg: TrainConfig, *,
                  update_chunk_rows: int = UPDATE_CHUNK_ROWS, finetune: FinetuneConfig | None = None) -> StepFns:
  """Builds the pure init / train / eval functions for one model and optimizer configuration.

  ``update_chunk_rows``: rows per step of the sharded sparse Adam loop (``optim``). ``finetune``: a
  ``FinetuneConfig`` whose ``method`` (if set) replaces the training step by the finetuning step.
  """
  method = finetune.method if finetune is not None else None
  if method is not None:
    return _finetune_step_fns(model_cfg, train_cfg, finetune)
  sparse = model_cfg.memory.row_sparse
  num_slots = model_cfg.memory.layer.num_slots
  backend = model_cfg.memory.backend
  layer = model_cfg.memory.layer
  table_readers = len(model_cfg.memory.layers) if model_cfg.memory.shared else 1
  lookups = train_cfg.batch_size * train_cfg.seq_len * layer.heads * layer.k * table_readers
  if sparse and backend == "auto" and lookups < num_slots:
    # The sparse step updates the donated table in place. An opaque kernel (custom call) that reads
    # the table makes XLA copy the whole table first (O(slots) per step, measured); XLA's own
    # gather does not. So sparse steps on tables larger than a step's lookups read the table with
    # the "xla" backend unless told otherwise. With at least as many lookups as slots the copy is
    # the cheaper part: the knowledge sweep's Memory+ step (393k lookups, 65k slots) takes 230 ms
    # with the kernels against 265 ms with XLA's gather (interleaved medians of 9).
    backend = "xla"
  model_tx = make_model_tx(train_cfg)
  value_tx = None if sparse else make_dense_value_tx(train_cfg)
  value_lr = lr_schedule(train_cfg.value_learning_rate, train_cfg)
  model_lr = lr_schedule(train_cfg.lr, train_cfg)
  adam = dict(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.value_weight_decay)

  abstract = nnx.eval_shape(lambda: LM(model_cfg, backend=backend, rngs=nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract)
  pools = value_pools(abstract)
  readers = len(abstract.memory_blocks)

  def start(params, values, stats=None):
    if sparse:
      value_opt = {p.key: sparse_adam_init(_get(values, p.path)[...]) for p in pools}
    else:
      value_opt = value_tx.init(values)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "values": values,
            "opt": model_tx.init(params), "value_opt": value_opt}

  def init(seed):
    model = LM(model_cfg, backend=backend, rngs=nnx.Rngs(jax.random.key(seed)))
    _, params, values = split_model(model)
    return start(params, values)

  def forward(params, values, batch, taps):
    model = merge_model(graphdef, params, values)
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], value_taps=taps)
    ce, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    lookups = [(r.indices, r.weights) for r in aux["memory"]]
    peer = tuple((r.indices, r.gates) for r in aux["peer"])
    return ce + aux["moe_loss"], LossAux(ce, aux["moe_loss"], count, lookups, peer)

  def sparse_taps(params, values, batch):
    """Loss, aux, param grads and ``{pool key: PoolTaps}``: the value tables are read under
    stop_gradient and each read gets a zero "tap" whose cotangent is the read's."""
    b, t = batch["inputs"].shape
    dv = model_cfg.memory.layer.value_dim
    taps = [jnp.zeros((b, t, dv), jnp.float32) for _ in range(readers)]
    (loss, aux), (g_params, g_taps) = jax.value_and_grad(
        lambda p, tp: forward(p, values, batch, tp), argnums=(0, 1), has_aux=True)(params, taps)
    inputs = {}
    for pool in pools:
      idx = jnp.stack([aux.lookups[j][0].reshape(b, t, -1) for j in pool.readers])
      wts = jnp.stack([aux.lookups[j][1].reshape(b, t, -1) for j in pool.readers])
      inputs[pool.key] = PoolTaps(idx, wts, jnp.stack([g_taps[j] for j in pool.readers]))
    return loss, aux, g_params, inputs

  def dense_grads(params, values, batch):
    (loss, aux), (g_params, g_values) = jax.value_and_grad(
        lambda p, v: forward(p, v, batch, None), argnums=(0, 1), has_aux=True)(params, values)
    return loss, aux, g_params, g_values

  def accumulated(params, values, batch, taps_mode=sparse):
    """One forward/backward pass over ``train.microbatches`` slices of the batch, summed: the gradients of the whole
    batch's loss (the token-weighted mean cross-entropy; the MoE balancing loss is averaged over the
    microbatches). Microbatch i holds rows i, i + k, i + 2k, ... so every batch shard splits locally.
    The sparse update's taps are put back in the batch's row order. ``taps_mode``: the value
    gradient as taps (``{pool key: PoolTaps}``, the sparse and the fused updates) or dense."""
    k = train_cfg.microbatches
    if k == 1:
      return (sparse_taps if taps_mode else dense_grads)(params, values, batch)
    total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    micro = {key: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1) for key, x in batch.items()}

    def weighted(p, v, mb, taps):
      loss, aux = forward(p, v, mb, taps)
      scaled = aux.ce * (aux.tokens / total) + aux.moe_loss / k
      return scaled, aux

    def body(acc, mb):
      if taps_mode:
        b, t = mb["inputs"].shape
        taps = [jnp.zeros((b, t, model_cfg.memory.layer.value_dim), jnp.float32) for _ in range(readers)]
        (loss, aux), (g_p, g_t) = jax.value_and_grad(lambda p, tp: weighted(p, values, mb, tp), argnums=(0, 1),
                                                     has_aux=True)(params, taps)
        g_second = None
        out = {pool.key: PoolTaps(jnp.stack([aux.lookups[j][0].reshape(b, t, -1) for j in pool.readers]),
                                  jnp.stack([aux.lookups[j][1].reshape(b, t, -1) for j in pool.readers]),
                                  jnp.stack([g_t[j] for j in pool.readers])) for pool in pools}
      else:
        (loss, aux), (g_p, g_second) = jax.value_and_grad(lambda p, v: weighted(p, v, mb, None), argnums=(0, 1),
                                                          has_aux=True)(params, values)
        out = None
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      acc = {"loss": acc["loss"] + loss, "ce": acc["ce"] + aux.ce * (aux.tokens / total),
             "moe": acc["moe"] + aux.moe_loss / k, "tokens": acc["tokens"] + aux.tokens,
             "g_params": add(acc["g_params"], g_p),
             "g_values": add(acc["g_values"], g_second) if g_second is not None else acc["g_values"]}
      return acc, out

    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
    acc0 = {"loss": jnp.zeros(()), "ce": jnp.zeros(()), "moe": jnp.zeros(()), "tokens": jnp.zeros(()),
            "g_params": zeros(params), "g_values": None if taps_mode else zeros(values)}
    acc, taps = jax.lax.scan(body, acc0, micro)
    aux = LossAux(acc["ce"], acc["moe"], acc["tokens"], None)
    if not taps_mode:
      return acc["loss"], aux, acc["g_params"], acc["g_values"]

    def unsplit(x_KxRxb):  # [k, R, b, ...] -> [R, b * k, ...] in the batch's row order (row m*k + i)
      x = jnp.moveaxis(x_KxRxb, 0, 2)
      return x.reshape(x.shape[0], x.shape[1] * k, *x.shape[3:])
    return acc["loss"], aux, acc["g_params"], {key: PoolTaps(*map(unsplit, t)) for key, t in taps.items()}

  def grads(state, batch):
    """Loss, aux and gradients (accumulated over ``train.microbatches``). The value gradient is dense
    (a State like ``values``) in dense mode, and ``{pool key: (rows [U], row_grads [U, Dv])}`` in sparse
    mode (over the whole batch: the train step under a mesh computes them per shard instead,
    ``optim.sharded_sparse_value_update``)."""
    loss, aux, g_params, second = accumulated(state["params"], state["values"], batch)
    if sparse:
      second = {key: embedding_bag_row_grads(*taps, num_slots) for key, taps in second.items()}
    return loss, aux, g_params, second

  def fused_dense(values) -> bool:
    """The dense update runs the fused CPU kernels where lowered for CPU: every table fp32, the
    kernels built, one device (no mesh of several: the kernels are opaque to GSPMD) and
    ``train.fused_value_update`` on (the sparse update decides the same in ``sparse_value_update``)."""
    if sparse or not train_cfg.fused_value_update or not pools:
      return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
      return False
    flat = {tuple(p): v for p, v in nnx.to_flat_state(values)}
    return all(fused_update_available(flat[p.path][...]) for p in pools)

  def after_backward(outputs):
    """The sparse update's inputs behind an optimization barrier (``train.update_barrier``): the
    row-gradient kernel, the merge and Adam start only once every gradient exists, so the compiler
    cannot hold their buffers beside the backward's. An identity on the values. (The dense update is
    left alone: there the barrier kept ~1 GB more on the probes, docs/planner.md.)"""
    return jax.lax.optimization_barrier(outputs) if train_cfg.update_barrier else outputs

  def train_step(state, batch):
    params, values, step = state["params"], state["values"], state["step"]
    if sparse:
      loss, aux, g_params, inputs = accumulated(params, values, batch)
      g_params, inputs = after_backward((g_params, inputs))
      new_value_opt, sq_norm = dict(state["value_opt"]), 0.0
      flat = {tuple(p): v for p, v in nnx.to_flat_state(values)}
      for pool in pools:
        table = flat[pool.path][...]
        specs = sharding.sparse_update_specs(model_cfg.memory.value_sharding, batch["inputs"].shape[0],
                                             table.shape)
        table, new_value_opt[pool.key], sq = sparse_value_update(
            specs, table, state["value_opt"][pool.key], *inputs[pool.key], value_lr(step),
            clip=train_cfg.value_clip, chunk_rows=update_chunk_rows, fused=train_cfg.fused_value_update, **adam)
        sq_norm = sq_norm + sq
        flat[pool.path] = flat[pool.path].replace(table)
      new_values = nnx.from_flat_state(flat)
      value_grad_norm = jnp.sqrt(sq_norm)
    elif fused_dense(values):
      # Lowered for CPU: the reads' taps and the fused kernels (optim.fused_dense_value_update); for
      # other platforms the dense gradient and the optax chain. The same update either way.
      def on_cpu(params, values, value_opt, batch):
        loss, aux, g_params, taps = accumulated(params, values, batch, taps_mode=True)
        flat = {tuple(p): v for p, v in nnx.to_flat_state(values)}
        tables = {p.path: flat[p.path][...] for p in pools}
        new_tables, moments, count, norm = fused_dense_value_update(
            tables, {p.path: tuple(taps[p.key]) for p in pools}, value_opt, train_cfg, value_lr)
        for path, table in new_tables.items():
          flat[path] = flat[path].replace(table)
        return (loss, aux.ce, aux.moe_loss, aux.tokens, g_params, nnx.from_flat_state(flat),
                with_dense_moments(value_opt, moments, count), norm)

      def elsewhere(params, values, value_opt, batch):
        loss, aux, g_params, g_values = accumulated(params, values, batch, taps_mode=False)
        updates, new_value_opt = value_tx.update(g_values, value_opt, values)
        return (loss, aux.ce, aux.moe_loss, aux.tokens, g_params, optax.apply_updates(values, updates),
                new_value_opt, optax.tree.norm(g_values))

      loss, ce, moe_loss, tokens, g_params, new_values, new_value_opt, value_grad_norm = jax.lax.platform_dependent(
          params, values, state["value_opt"], batch, cpu=on_cpu, default=elsewhere)
      aux = LossAux(ce, moe_loss, tokens, None)
    else:
      loss, aux, g_params, g_values = grads(state, batch)
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
    metrics = {"loss": loss, "ce": aux.ce, "moe_loss": aux.moe_loss, "grad_norm": grad_norm,
               "value_grad_norm": value_grad_norm, "lr": model_lr(step), "value_lr": value_lr(step),
               "tokens": aux.tokens, "finite": finite}
    return new_state, metrics

  def eval_step(state, batch):
    _, aux = forward(state["params"], state["values"], batch, None)
    return {"ce": aux.ce, "tokens": aux.tokens, "lookups": aux.lookups, "peer_lookups": aux.peer_lookups}

  def logits(state, tokens_BxT):
    return merge_model(graphdef, state["params"], state["values"])(tokens_BxT)[0]

  def backward(state, batch):
    return accumulated(state["params"], state["values"], batch)

  return StepFns(graphdef, pools, sparse, model_tx, value_tx, init, start, grads, train_step, eval_step, logits,
                 backward=backward)


def _finetune_step_fns(model_cfg: ModelConfig, train_cfg: TrainConfig, ft: FinetuneConfig) -> StepFns:
  """``make_step_fns`` for ``ft.method`` in ("full", "memory", "smf", "lora"): the finetune optimizer
  (``ft.optimizer`` at the constant ``ft.lr``; Adam with ``train.b1, b2, eps``; no clip or decay),
  dense value gradients, for "smf" the row mask of ``finetune.select_slots`` per pool, for "lora" the
  adapters ``state["lora"]`` (``finetune.lora_init``) as the only trained parameters."""
  from memjax.train.finetune import lora_init, lora_merge, select_slots, slot_reads

  method, lr = ft.method, ft.lr
  num_slots = model_cfg.memory.layer.num_slots
  backend = model_cfg.memory.backend
  if model_cfg.memory.row_sparse and backend == "auto":
    backend = "xla"
  b1, b2, eps = train_cfg.b1, train_cfg.b2, train_cfg.eps
  if method in ("full", "lora"):  # "lora": the optimizer of the adapters
    model_tx = optax.sgd(lr) if ft.optimizer == "sgd" else optax.adam(lr, b1=b1, b2=b2, eps=eps)
  else:
    model_tx = optax.identity()  # frozen: no optimizer state
  abstract = nnx.eval_shape(lambda: LM(model_cfg, backend=backend, rngs=nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract)
  pools = value_pools(abstract)

  def start(params, values, stats=None):
    value_opt = ({p.key: sparse_adam_init(_get(values, p.path)[...]) for p in pools}
                 if ft.optimizer == "adam" and method in ("full", "memory", "smf") else {})
    if method == "smf":
      stats = stats if stats is not None else {p.key: jnp.zeros((num_slots,), jnp.float32) for p in pools}
    else:
      stats = {}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "values": values, "value_opt": value_opt,
             "stats": stats}
    if method == "lora":
      lora = lora_init(model_cfg, params, ft.lora_rank, jax.random.key(train_cfg.seed))
      return {**state, "lora": lora, "opt": model_tx.init(lora)}
    return {**state, "opt": model_tx.init(params)}

  def effective(state):
    """The parameters the model runs with: the base, plus the adapters with "lora"."""
    return lora_merge(model_cfg, state["params"], state["lora"]) if method == "lora" else state["params"]

  def init(seed):
    _, params, values = split_model(LM(model_cfg, backend=backend, rngs=nnx.Rngs(jax.random.key(seed))))
    return start(params, values)

  def forward(params, values, batch):
    model = merge_model(graphdef, params, values)
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    ce, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    lookups = [(r.indices, r.weights) for r in aux["memory"]]
    return ce + aux["moe_loss"], LossAux(ce, aux["moe_loss"], count, lookups)

  def grads(state, batch):
    params, values = state["params"], state["values"]
    if method == "lora":  # gradients of the adapters only; g_params are those of state["lora"]
      (loss, aux), g_lora = jax.value_and_grad(
          lambda lo: forward(lora_merge(model_cfg, params, lo), values, batch), has_aux=True)(state["lora"])
      return loss, aux, g_lora, None
    if method == "full":
      (loss, aux), (g_params, g_values) = jax.value_and_grad(forward, argnums=(0, 1), has_aux=True)(
          params, values, batch)
    else:
      (loss, aux), g_values = jax.value_and_grad(lambda v: forward(params, v, batch), has_aux=True)(values)
      g_params = None
    return loss, aux, g_params, g_values

  def row_masks(state, aux, batch):
    """``{pool key: [M] bool}``: the slots that may change this step (None: every slot)."""
    if method != "smf":
      return {p.key: None for p in pools}
    out = {}
    for p in pools:
      reads = slot_reads([aux.lookups[j][0] for j in p.readers], batch["loss_mask"], num_slots)
      out[p.key] = select_slots(reads, state["stats"][p.key], ft.background_batches, ft.top_t)
    return out

  def train_step(state, batch):
    loss, aux, g_params, g_values = grads(state, batch)
    masks = row_masks(state, aux, batch)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state["values"])}
    g_flat = {tuple(p): v for p, v in nnx.to_flat_state(g_values)} if g_values is not None else {}
    new_value_opt, sq_norm, updated = {}, 0.0, 0
    for p in (pools if g_values is not None else ()):
      table, g = flat[p.path][...], g_flat[p.path][...].astype(jnp.float32)
      rows = masks[p.key]
      if rows is not None:
        g = jnp.where(rows[:, None], g, 0.0)
        updated = updated + jnp.sum(rows.astype(jnp.int32))
      sq_norm = sq_norm + jnp.sum(jnp.square(g))
      if ft.optimizer == "adam":
        st = state["value_opt"][p.key]
        count = st.count + 1
        mu = b1 * st.mu + (1.0 - b1) * g
        nu = b2 * st.nu + (1.0 - b2) * g * g
        tf = count.astype(jnp.float32)
        step_ = lr * (mu / (1.0 - b1**tf)) / (jnp.sqrt(nu / (1.0 - b2**tf)) + eps)
        if rows is not None:  # lazy: the moments of rows not selected stay as they were
          mu, nu = jnp.where(rows[:, None], mu, st.mu), jnp.where(rows[:, None], nu, st.nu)
        new_value_opt[p.key] = SparseAdamState(mu, nu, count)
      else:
        step_ = lr * g
      new = (table.astype(jnp.float32) - step_).astype(table.dtype)
      if rows is not None:
        new = jnp.where(rows[:, None], new, table)  # bitwise: rows not selected are not touched
      flat[p.path] = flat[p.path].replace(new)
    new_values = nnx.from_flat_state(flat) if g_values is not None else state["values"]
    value_grad_norm = jnp.sqrt(sq_norm)
    extra = {}
    if method == "lora":
      grad_norm = optax.tree.norm(g_params)
      updates, new_opt = model_tx.update(g_params, state["opt"], state["lora"])
      extra = {"lora": optax.apply_updates(state["lora"], updates)}
      new_params = state["params"]
    elif g_params is not None:
      grad_norm = optax.tree.norm(g_params)
      updates, new_opt = model_tx.update(g_params, state["opt"], state["params"])
      new_params = optax.apply_updates(state["params"], updates)
    else:
      grad_norm, new_opt, new_params = jnp.zeros(()), state["opt"], state["params"]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(value_grad_norm)
    new_state = {"step": state["step"] + 1, "params": new_params, "values": new_values, "opt": new_opt,
                 "value_opt": new_value_opt, "stats": state["stats"], **extra}
    if train_cfg.nan_policy == "skip":
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {**new_state, **{k: keep(new_state[k], state[k]) for k in ("params", "values", "opt", "value_opt",
                                                                              *extra)}}
    lr_now = jnp.asarray(lr, jnp.float32)
    metrics = {"loss": loss, "ce": aux.ce, "moe_loss": aux.moe_loss, "grad_norm": grad_norm,
               "value_grad_norm": value_grad_norm, "lr": lr_now if method in ("full", "lora") else jnp.zeros(()),
               "value_lr": lr_now if method != "lora" else jnp.zeros(()), "tokens": aux.tokens, "finite": finite}
    if method == "smf":
      metrics["slots_updated"] = updated
    return new_state, metrics

  def eval_step(state, batch):
    _, aux = forward(effective(state), state["values"], batch)
    return {"ce": aux.ce, "tokens": aux.tokens, "lookups": aux.lookups}

  def logits(state, tokens_BxT):
    return merge_model(graphdef, effective(state), state["values"])(tokens_BxT)[0]

  return StepFns(graphdef, pools, False, model_tx, None, init, start, grads, train_step, eval_step, logits,
                 finetune=method, merged_params=effective if method == "lora" else None)


# ----- sharding of the state and the one jit ----------------------------------------------------------


def state_shardings(fns: StepFns, abstract_state, mesh: Mesh, rules: dict):
  """NamedShardings for every leaf of the train state: parameters by their logical axes, optimizer
  moments like their parameters, scalars replicated."""
  rep = sharding.replicated(mesh)
  params_sh = sharding.state_shardings(abstract_state["params"], mesh, rules)
  values_sh = sharding.state_shardings(abstract_state["values"], mesh, rules)

  def like_params(tx, opt_state, params_sharding):
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, params_sharding,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, (nnx.Variable, NamedSharding)))

  lora_sh = jax.tree.map(lambda _: rep, abstract_state["lora"]) if "lora" in abstract_state else None
  opt_sh = like_params(fns.model_tx, abstract_state["opt"], params_sh if lora_sh is None else lora_sh)
  if fns.sparse or fns.finetune is not None:
    value_opt_sh = {}
    for pool in fns.pools:
      table_sh = _get(values_sh, pool.path)
      if pool.key in abstract_state["value_opt"]:
        value_opt_sh[pool.key] = SparseAdamState(table_sh, table_sh, rep)
  else:
    value_opt_sh = like_params(fns.value_tx, abstract_state["value_opt"], values_sh)
  out = {"step": rep, "params": params_sh, "values": values_sh, "opt": opt_sh, "value_opt": value_opt_sh}
  if "stats" in abstract_state:
    out["stats"] = {k: rep for k in abstract_state["stats"]}
  if lora_sh is not None:
    out["lora"] = lora_sh
  return out


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying ``shardings`` (a prefix tree of NamedShardings): restore targets and
  ahead-of-time compile arguments."""
  def one(sh, subtree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), subtree)
  return jax.tree.map(one, shardings, abstract_tree, is_leaf=lambda x: isinstance(x, NamedSharding))


@dataclasses.dataclass(frozen=True)
class Steps:
  """The steps of ``StepFns`` jitted for one mesh (``jit_steps``), with the shardings they use.

  init(seed) -> state; train(state, batch) -> (state, metrics), donating the state; eval(state,
  batch) -> replicated metrics and lookups; logits(state, tokens) -> replicated logits. Evaluation
  outputs are small and replicated, so every process of a multi-process run can read them.
  """

  fns: StepFns
  mesh: Mesh
  abstract_state: Any
  state_sharding: Any
  batch_sharding: NamedSharding
  init: Any
  train: Any
  eval: Any
  logits: Any
  start: Any = None

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global batch (for ``.trace(...).lower()``)."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_DTYPES.items()}

  def abstract_args(self, batch_size: int, seq_len: int):
    """(state, batch) ShapeDtypeStructs of the train step: nothing allocated."""
    return with_shardings(self.abstract_state, self.state_sharding), self.abstract_batch(batch_size, seq_len)


def jit_steps(fns: StepFns, mesh: Mesh, value_sharding: str) -> Steps:
  """Jits ``fns`` once for ``mesh``: explicit in/out shardings from the logical axis rules of
  ``value_sharding``, the state donated to the train step."""
  rules = sharding.axis_rules(value_sharding)
  abstract = jax.eval_shape(fns.init, 0)
  state_sh = state_shardings(fns, abstract, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  return Steps(
      fns=fns, mesh=mesh, abstract_state=abstract, state_sharding=state_sh, batch_sharding=batch_sh,
      init=jax.jit(fns.init, out_shardings=state_sh),
      train=jax.jit(fns.train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                    donate_argnums=0),
      eval=jax.jit(fns.eval_step, in_shardings=(state_sh, batch_sh), out_shardings=rep),
      logits=jax.jit(fns.logits, in_shardings=(state_sh, rep), out_shardings=rep),
      start=jax.jit(fns.start, out_shardings=state_sh))


def compile_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh_sizes: dict, *, devices=None,
                       update_chunk_rows: int = UPDATE_CHUNK_ROWS):
  """The sharded train step, compiled ahead of time from ShapeDtypeStructs (nothing allocated).

  Returns ``(compiled, steps)``: the step is the one the training loop runs (``jit_steps``).

  Example (8 fake CPU devices)::

    compiled, steps = compile_train_step(cfg.model, cfg.train, {"data": 2, "fsdp": 1, "memory": 4})
    compiled.memory_analysis().temp_size_in_bytes
  """
  mesh = sharding.make_mesh(mesh_sizes, devices)
  steps = jit_steps(make_step_fns(model_cfg, train_cfg, update_chunk_rows=update_chunk_rows), mesh,
                    model_cfg.memory.value_sharding)
  with jax.set_mesh(mesh):  # the memory read finds the mesh here (``sharded_memory_read``)
    compiled = steps.train.trace(*steps.abstract_args(train_cfg.batch_size, train_cfg.seq_len)).lower().compile()
  return compiled, steps
