"""A decoder-only LM whose blocks choose their feed-forward: dense SwiGLU, memory / Memory+, MoE or PEER.

Shapes:
  B batch   T sequence   C model width   V vocabulary   N query heads   Dh head width
  F FFN hidden   E experts   Dv memory value width

Block (pre-norm):  h = x + Attn(norm(x));  out = h + FFN(norm(h))  with FFN one of
  dense:   W_down (silu(x W_gate) * (x W_up))                        [B, T, C] -> [B, T, C]
  memory:  ``ProductKeyMemory`` (Memory+ when swilu), all memory blocks reading one ``ValueTable``
           when ``memory.shared``
  moe:     top-k routed SwiGLU experts with a load-balancing loss (``memjax.moe``)
  peer:    product-key retrieval of single-neuron experts (``memjax.peer``), per token

Attention is causal and, when ``segment_ids`` are given, restricted to the same packed document.
``__call__`` returns ``(logits [B, T, V] fp32, aux)`` with ``aux = {"moe_loss": scalar,
"memory": [MemoryOutput per memory block], "peer": [PEEROutput per PEER block]}``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.attention import attention, attention_mask, masked_attention
from memjax.config import COMPUTE_DTYPES, ModelConfig
from memjax.memory.layer import MemoryOutput, MemoryValue, ProductKeyMemory, ValueTable
from memjax.moe import MoE
from memjax.peer import PEER, PEEROutput
from memjax.nn import normal_param, param, rms_norm
from memjax.sharding import EMBED, HEAD_DIM, HEADS, MLP, VOCAB, constrain_batch


# ----- pure helpers -----------------------------------------------------------------------------


def rope(x_BxTxNxD, positions_BxT, theta: float):
  """Rotary position embedding on pairs (first half, second half) of the head dim."""
  d = x_BxTxNxD.shape[-1]
  freqs_D2 = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
  angles_BxTxD2 = positions_BxT.astype(jnp.float32)[:, :, None] * freqs_D2[None, None, :]
  sin, cos = jnp.sin(angles_BxTxD2)[:, :, None, :], jnp.cos(angles_BxTxD2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxD.dtype)


# ----- modules ----------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = param(jnp.ones((dim,), jnp.float32), EMBED)

  def __call__(self, x):
    return rms_norm(x, self.scale[...])


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    c, n, d = cfg.dim, cfg.num_heads, cfg.head_dim
    self.cfg = cfg
    self.wq = normal_param(rngs, (c, n, d), c**-0.5, EMBED, HEADS, HEAD_DIM)
    self.wk = normal_param(rngs, (c, n, d), c**-0.5, EMBED, HEADS, HEAD_DIM)
    self.wv = normal_param(rngs, (c, n, d), c**-0.5, EMBED, HEADS, HEAD_DIM)
    self.wo = normal_param(rngs, (n, d, c), (n * d) ** -0.5 / (2 * cfg.num_layers) ** 0.5, HEADS, HEAD_DIM, EMBED)

  def qkv(self, x_BxTxC, positions_BxT):
    """Queries, keys and values [B, T, N, Dh], RoPE applied to q and k."""
    dt = x_BxTxC.dtype
    q, k, v = (constrain_batch(jnp.einsum("btc,cnd->btnd", x_BxTxC, w[...].astype(dt))) for w in (self.wq, self.wk, self.wv))
    return rope(q, positions_BxT, self.cfg.rope_theta), rope(k, positions_BxT, self.cfg.rope_theta), v

  def attend(self, q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, mask_Bx1xTxS):
    """Softmax attention of T queries over S keys (masked-out keys get zero weight) -> [B, T, C]."""
    out_BxTxNxD = masked_attention(q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, mask_Bx1xTxS)
    return self.project(out_BxTxNxD)

  def project(self, out_BxTxNxD):
    return jnp.einsum("btnd,ndc->btc", out_BxTxNxD, self.wo[...].astype(out_BxTxNxD.dtype))

  def __call__(self, x_BxTxC, positions_BxT, segment_ids_BxT):
    """Causal attention within documents by ``cfg.attention`` (``memjax.attention``) -> [B, T, C]."""
    q, k, v = self.qkv(x_BxTxC, positions_BxT)
    return self.project(attention(q, k, v, segment_ids_BxT, impl=self.cfg.attention))

  def cached(self, x_BxTxC, positions_BxT, cache: tuple):
    """Attention through a KV cache ``(k, v)`` of [B, S, N, Dh]: this call's keys and values are written
    at their positions (cache slot s holds position s), then each query attends to every slot at or
    before its own position. Returns ``(out [B, T, C], new cache)``."""
    cache_k, cache_v = cache
    q, k, v = self.qkv(x_BxTxC, positions_BxT)
    slots_S = jnp.arange(cache_k.shape[1], dtype=positions_BxT.dtype)
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    rows_Bx1 = jnp.arange(x_BxTxC.shape[0])[:, None]
    scatter = lambda: (cache_k.at[rows_Bx1, positions_BxT].set(k), cache_v.at[rows_Bx1, positions_BxT].set(v))
    if x_BxTxC.shape[1] == 1:
      # A decode step. The TPU compiler copies the cache for this scatter (temporaries ~1.6x the cache,
      # seen compiling for v5p) but updates an elementwise select in place; on CPU the scatter is faster.
      write_BxSx1x1 = (slots_S[None, :] == positions_BxT)[:, :, None, None]
      select = lambda: (jnp.where(write_BxSx1x1, k, cache_k), jnp.where(write_BxSx1x1, v, cache_v))
      cache_k, cache_v = jax.lax.platform_dependent(default=scatter, tpu=select)
    else:
      cache_k, cache_v = scatter()
    mask_Bx1xTxS = (slots_S[None, None, :] <= positions_BxT[:, :, None])[:, None]
    dt = x_BxTxC.dtype
    return self.attend(q, cache_k.astype(dt), cache_v.astype(dt), mask_Bx1xTxS), (cache_k, cache_v)


class SwiGLU(nnx.Module):
  """Dense feed-forward W_down (silu(x W_gate) * (x W_up))."""

  def __init__(self, dim: int, mlp_dim: int, num_layers: int, *, rngs: nnx.Rngs):
    self.w_gate = normal_param(rngs, (dim, mlp_dim), dim**-0.5, EMBED, MLP)
    self.w_up = normal_param(rngs, (dim, mlp_dim), dim**-0.5, EMBED, MLP)
    self.w_down = normal_param(rngs, (mlp_dim, dim), mlp_dim**-0.5 / (2 * num_layers) ** 0.5, MLP, EMBED)

  def __call__(self, x):
    dt = x.dtype
    h = constrain_batch(jax.nn.silu(x @ self.w_gate[...].astype(dt)) * (x @ self.w_up[...].astype(dt)))
    return h @ self.w_down[...].astype(dt)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, index: int, pool: ValueTable | None, *, backend: str, rngs: nnx.Rngs):
    self.kind = cfg.block_kind(index)
    self.attn_norm = RMSNorm(cfg.dim)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.dim)
    if self.kind == "dense":
      self.ffn = SwiGLU(cfg.dim, cfg.mlp_dim, cfg.num_layers, rngs=rngs)
    elif self.kind == "moe":
      self.ffn = MoE(cfg.dim, cfg.moe, cfg.moe_mlp_dim, cfg.num_layers, rngs=rngs)
    elif self.kind == "peer":
      self.ffn = PEER(cfg.dim, cfg.peer, rngs=rngs)
    else:
      self.ffn = ProductKeyMemory(cfg.dim, cfg.memory.layer, values=pool, backend=backend,
                                  value_sharding=cfg.memory.value_sharding, rngs=rngs)

  def __call__(self, x_BxTxC, positions_BxT, segment_ids_BxT, value_tap=None, *, cache=None, dropless=False,
               read_mask=None):
    """``(out, aux)``; with ``cache`` (a ``(k, v)`` pair, see ``Attention.cached``) attention goes through
    the cache and ``aux["cache"]`` holds the updated pair. ``dropless``: MoE experts take every token
    (capacity = tokens), as generation does. ``read_mask``: see ``ProductKeyMemory.read``."""
    aux = {}
    if cache is None:
      h = x_BxTxC + self.attn(self.attn_norm(x_BxTxC), positions_BxT, segment_ids_BxT)
    else:
      a, aux["cache"] = self.attn.cached(self.attn_norm(x_BxTxC), positions_BxT, cache)
      h = x_BxTxC + a
    y = self.ffn_norm(h)
    if self.kind == "dense":
      out = self.ffn(y)
    elif self.kind == "moe":
      out, aux["moe_loss"] = self.ffn(y, dropless=dropless)
    elif self.kind == "peer":
      r = self.ffn.read(y)
      out, aux["peer"] = r.out, r
    else:
      r = self.ffn.read(y, value_tap=value_tap, read_mask=read_mask)
      out, aux["memory"] = r.out, r
    return h + out, aux


REMAT_POLICIES = {
    "none": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each block's input; recompute the rest
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
}


def _rematerialised(remat: str):
  """How ``LM`` calls a block: directly, or under ``nnx.remat`` with ``REMAT_POLICIES[remat]`` (per block:
  the backward pass recomputes what the policy does not save)."""
  if remat == "none":
    return lambda block, *args: block(*args)

  def call(block, *args):
    # A pure function of the block's state (not nnx.remat: a block holds the shared value pool, which
    # nnx.remat would try to write back from inside the checkpointed trace).
    graphdef, state = nnx.split(block)
    run = lambda st, *a: nnx.merge(graphdef, st)(*a)
    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, *args)
  return call


class LM(nnx.Module):
  """The language model. ``LM(cfg, rngs=nnx.Rngs(0))(tokens)`` -> ``(logits, aux)``.

  ``backend`` overrides ``cfg.memory.backend`` (the memory reads' ``embedding_bag`` backend).

  Example:
    >>> cfg = ModelConfig(vocab_size=50, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
    >>> logits, aux = LM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 8), jnp.int32))
    >>> logits.shape
    (2, 8, 50)
  """

  def __init__(self, cfg: ModelConfig, *, backend: str | None = None, rngs: nnx.Rngs):
    if cfg.vocab_size < 1:
      raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} must be set (0 means \"the tokenizer's\": "
                       "use Config.with_vocab(tokenizer.vocab_size) first)")
    backend = cfg.memory.backend if backend is None else backend
    self.cfg = cfg
    self.embed = normal_param(rngs, (cfg.vocab_size, cfg.dim), 1.0, VOCAB, EMBED)
    if not cfg.tie_embeddings:
      self.unembed = normal_param(rngs, (cfg.dim, cfg.vocab_size), cfg.dim**-0.5, EMBED, VOCAB)
    mem = cfg.memory
    # One pool for all memory blocks when shared; otherwise each memory block creates its own.
    self.pool = ValueTable(mem.layer, rngs=rngs) if (mem.layers and mem.shared) else None
    self.blocks = nnx.List([Block(cfg, i, self.pool, backend=backend, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.dim)

  @property
  def memory_blocks(self) -> list[int]:
    return [i for i, b in enumerate(self.blocks) if b.kind == "memory"]

  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, *, value_taps=None, read_masks=None):
    """Logits [B, T, V] (fp32) and aux; ``value_taps``: one [B, T, Dv] zero array per memory block;
    ``read_masks``: one ``read_mask`` (or None) per memory block (``ProductKeyMemory.read``)."""
    b, t = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    dt = COMPUTE_DTYPES[self.cfg.dtype]
    table = self.embed[...]
    x = constrain_batch(jnp.take(table, tokens_BxT, axis=0).astype(dt))  # [B, T, C], batch split (FSDP)
    moe_loss = jnp.zeros((), jnp.float32)
    memory: list[MemoryOutput] = []
    peer: list[PEEROutput] = []
    taps = list(value_taps) if value_taps is not None else None
    masks = list(read_masks) if read_masks is not None else None
    call = _rematerialised(self.cfg.remat)
    for block in self.blocks:
      tap = taps.pop(0) if (taps is not None and block.kind == "memory") else None
      read_mask = masks.pop(0) if (masks is not None and block.kind == "memory") else None
      if read_mask is not None:
        x, aux = block(x, positions_BxT, segment_ids_BxT, tap, read_mask=read_mask)
      else:
        x, aux = call(block, x, positions_BxT, segment_ids_BxT, tap)
      x = constrain_batch(x)
      if "moe_loss" in aux:
        moe_loss = moe_loss + aux["moe_loss"]
      if "memory" in aux:
        memory.append(aux["memory"])
      if "peer" in aux:
        peer.append(aux["peer"])
    return self.unembedding(x), {"moe_loss": moe_loss, "memory": memory, "peer": peer}

  def unembedding(self, x_BxTxC):
    """Final norm and output projection: [B, T, C] -> logits [B, T, V] fp32."""
    dt = COMPUTE_DTYPES[self.cfg.dtype]
    x = self.final_norm(x_BxTxC)
    w_out = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
    logits = jnp.einsum("btc,cv->btv", x, w_out.astype(dt), preferred_element_type=jnp.float32)
    if self.cfg.tie_embeddings:
      logits = logits * self.cfg.dim**-0.5
    return logits

  def init_cache(self, batch: int, length: int) -> tuple:
    """An empty KV cache: one ``(k, v)`` pair of zeros [B, S=length, N, Dh] (compute dtype) per block.

    Example:
      >>> cfg = ModelConfig(vocab_size=50, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
      >>> cache = LM(cfg, rngs=nnx.Rngs(0)).init_cache(3, 10)
      >>> len(cache), cache[0][0].shape
      (2, (3, 10, 2, 16))
    """
    shape = (batch, length, self.cfg.num_heads, self.cfg.head_dim)
    dt = COMPUTE_DTYPES[self.cfg.dtype]
    return tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in self.blocks)

  def decode(self, tokens_BxT, positions_BxT, cache: tuple, *, logits_at_B=None):
    """The forward pass through a KV cache (``init_cache``): prefill (T = the prompt window, positions
    0..T-1) and each decode step (T = 1, a position per row) are the same call.

    Attention writes the new keys and values at their positions and attends to the cache slots at or
    before each query's position (``Attention.cached``); memory layers read for the new tokens only (they
    need no cache); MoE layers run dropless. ``logits_at_B``: return logits [B, 1, V] at one index of T
    per row (the prompt's last token in prefill) instead of [B, T, V]. Returns ``(logits, new cache,
    aux)`` with ``aux = {"memory": [MemoryOutput per memory block]}``.

    Example:
      >>> cfg = ModelConfig(vocab_size=50, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
      >>> model = LM(cfg, rngs=nnx.Rngs(0))
      >>> tokens = jnp.array([[3, 4, 5]])
      >>> logits, cache, _ = model.decode(tokens, jnp.arange(3)[None], model.init_cache(1, 4))
      >>> bool(jnp.allclose(logits, model(tokens)[0], atol=1e-5))
      True
    """
    dt = COMPUTE_DTYPES[self.cfg.dtype]
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)  # [B, T, C]
    new_cache, memory = [], []
    for block, layer_cache in zip(self.blocks, cache):
      x, aux = block(x, positions_BxT, None, cache=layer_cache, dropless=True)
      new_cache.append(aux["cache"])
      if "memory" in aux:
        memory.append(aux["memory"])
    if logits_at_B is not None:
      x = jnp.take_along_axis(x, logits_at_B.astype(jnp.int32)[:, None, None], axis=1)  # [B, 1, C]
    return self.unembedding(x), tuple(new_cache), {"memory": memory}


# ----- the model's parameters in two groups, and the value pools ------------------------------------


def split_model(model: LM):
  """``(graphdef, params, values)``: the value tables (``MemoryValue``) apart from every other parameter."""
  graphdef, values, params = nnx.split(model, MemoryValue, nnx.Param)
  return graphdef, params, values


def merge_model(graphdef, params, values) -> LM:
  """The inverse of ``split_model``."""
  return nnx.merge(graphdef, values, params)


@dataclasses.dataclass(frozen=True)
class Pool:
  """One value table of a model and the memory blocks that read it.

  key: ``"/".join(path)``, the table's name in optimizer states (e.g. ``"pool/values"``).
  path: the table's path in the ``values`` State of ``split_model``.
  readers: positions among the memory blocks (``LM.memory_blocks``) that read this table, in order.
  """

  key: str
  path: tuple
  readers: tuple[int, ...]


def value_pools(model: LM) -> tuple[Pool, ...]:
  """Every value table of ``model`` with its readers (one pool when ``memory.shared``)."""
  paths = {id(v): tuple(path) for path, v in nnx.iter_graph(model) if isinstance(v, MemoryValue)}
  readers: dict[int, list[int]] = {}
  for j, i in enumerate(model.memory_blocks):
    readers.setdefault(id(model.blocks[i].ffn.values.values), []).append(j)
  return tuple(Pool("/".join(map(str, paths[var])), paths[var], tuple(r)) for var, r in readers.items())
