"""PEER (He 2024, "Mixture of A Million Experts"): product-key retrieval over single-neuron experts.

Pure functions first (``peer_forward``, its brute-force ``peer_forward_reference``), then the thin
NNX module ``PEER`` that a block uses as its feed-forward (``model.peer.layers``).

Shapes (``...`` is any leading batch shape, e.g. [B, T]):
  x        [..., C]           tokens in                 out      [..., C]
  W_q      [C, H, Dk]         one query per head        keys     [Hk, 2, n, Dk/2]  (Hk = 1: shared by heads)
  down     [E, C]             u_i, E = n * n experts    up       [E, C]            v_i
  scores / gates / indices    [..., H, k]               L = H * k experts per token

Forward, numbered:
  1. q = x W_q                                         [..., C] -> [..., H, Dk]
  2. (qk_norm) q, keys = rms-normalised halves          as ``memjax.memory.read.qk_normalize``
  3. per head, the exact top-k experts by product keys  [..., H, Dk] -> scores, indices [..., H, k]
     (``product_key_topk``: score of expert i*n + j is <q1, K1_i> + <q2, K2_j>)
  4. g = softmax(scores) over each head's k (or sigmoid(scores))            [..., H, k]
  5. h = <u_i, x> for the L retrieved experts (gather of down rows)          [..., H, k]
  6. out = sum over heads and their k of g * act(h) * v_i: one embedding bag over the up table
     with weights g * act(h)                                                [..., L] -> [..., C]

The up projection is exactly an embedding bag (``memjax.kernels.embedding_bag``, any backend: its
custom VJP gives the table's scatter-add gradient); the down projection is a gather of the L rows and
a dot with x (``jnp.take``: XLA's gather and its scatter-add gradient). The brute-force reference
scores all E experts, takes the exact top-k with one ``jax.lax.top_k`` and applies every expert
through dense [..., E] weights.

Parameters and sharding: W_q and the sub-keys are plain parameters; the two expert tables are plain
``nnx.Param`` [E, C] with logical axes (``experts``, ``embed``), i.e. sharded like the MoE experts
(C over ``fsdp``, the expert axis replicated), and they train in the model's dense AdamW group
(``memjax.optim``: ``train.lr``, ``train.weight_decay``, ``train.clip``), not in the value group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding as ax
from memjax.config import PEERConfig
from memjax.kernels.embedding_bag import embedding_bag
from memjax.memory.product_keys import product_key_topk, product_key_topk_reference
from memjax.memory.read import qk_normalize
from memjax.nn import normal_param, param

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu}


class PEEROutput(NamedTuple):
  """A PEER read: the output and the retrieval behind it (for expert-usage statistics)."""

  out: jax.Array  # [..., C]
  indices: jax.Array  # [..., H, k] int32 experts, i * n + j
  gates: jax.Array  # [..., H, k] fp32 router weights g


def peer_gates(scores_xHxk, gate: str = "softmax"):
  """Step 4: router weights [..., H, k] fp32 from the k scores of each head ("softmax" or "sigmoid")."""
  s = scores_xHxk.astype(jnp.float32)
  if gate == "softmax":
    return jax.nn.softmax(s, axis=-1)
  if gate == "sigmoid":
    return jax.nn.sigmoid(s)
  raise ValueError(f"gate={gate!r} is unknown; allowed: ['softmax', 'sigmoid']")


def peer_queries(x_xC, query_CxHxK, keys_HkX2xNxK2, query_gain_HxK=None, key_gain_Hkx2xK2=None):
  """Steps 1-2: ``(q [..., H, Dk], keys [H, 2, n, Dk/2])`` as the top-k sees them.

  Shared sub-keys (``Hk = 1``) are broadcast to the H heads (their gradient sums over the heads).
  With gains given, queries and sub-keys are qk-normalised (``qk_normalize``).
  """
  heads = query_CxHxK.shape[1]
  if keys_HkX2xNxK2.ndim != 4 or keys_HkX2xNxK2.shape[0] not in (1, heads):
    raise ValueError(f"keys must have shape [1 or H={heads}, 2, n, Dk/2], got {keys_HkX2xNxK2.shape}")
  q_xHxK = jnp.einsum("...c,chd->...hd", x_xC, query_CxHxK.astype(x_xC.dtype))  # [..., H, Dk]
  keys = keys_HkX2xNxK2
  if query_gain_HxK is not None:
    q_xHxK, keys = qk_normalize(q_xHxK, keys, query_gain_HxK, key_gain_Hkx2xK2)
  keys_Hx2xNxK2 = jnp.broadcast_to(keys, (heads, *keys.shape[1:]))
  return q_xHxK, keys_Hx2xNxK2


def _check_tables(x_xC, down_ExC, up_ExC, keys):
  n = keys.shape[2]
  for name, table in (("down", down_ExC), ("up", up_ExC)):
    if table.shape != (n * n, x_xC.shape[-1]):
      raise ValueError(f"{name} must have shape [E = n*n = {n * n}, C = {x_xC.shape[-1]}] for keys.shape="
                       f"{keys.shape} and x.shape={x_xC.shape}, got {name}.shape={table.shape}")


def peer_forward(x_xC, query_CxHxK, keys_HkX2xNxK2, down_ExC, up_ExC, *, top_k: int, activation: str = "gelu",
                 gate: str = "softmax", query_gain_HxK=None, key_gain_Hkx2xK2=None, topk: str = "auto",
                 backend: str = "auto") -> PEEROutput:
  """A PEER layer's forward pass (module docstring, steps 1-6), with product-key retrieval.

  Args:
    x_xC: [..., C] inputs.
    query_CxHxK: [C, H, Dk] query projection, one query per head.
    keys_HkX2xNxK2: [1 or H, 2, n, Dk/2] sub-keys (1: shared by every head).
    down_ExC, up_ExC: [E = n*n, C] the experts' down vectors u_i and up vectors v_i.
    top_k: experts per head k, ``<= n``.
    activation: one of ``ACTIVATIONS`` ("gelu": the tanh approximation, ``jax.nn.gelu``).
    gate: "softmax" (over each head's k scores) or "sigmoid" (elementwise).
    query_gain_HxK, key_gain_Hkx2xK2: qk-norm gains [H, Dk] and [Hk, 2, Dk/2]; None: no qk-norm.
    topk: the product top-k's backend (``product_key_topk``).
    backend: the up projection's ``embedding_bag`` backend. "auto" under a mesh of several devices
      is "xla": the expert tables are sharded by the mesh's rules, not inside a ``shard_map``, and
      XLA cannot partition a Pallas (Mosaic) kernel (seen compiling for TPU v5p).

  Returns:
    ``PEEROutput(out [..., C] in x's dtype, indices [..., H, k] int32, gates [..., H, k] fp32)``.

  Example:
    >>> x = jnp.ones((3, 8)); wq = jnp.ones((8, 2, 4)) / 8; keys = jnp.ones((1, 2, 4, 2))
    >>> down = up = jnp.ones((16, 8)) / 8
    >>> peer_forward(x, wq, keys, down, up, top_k=2).out.shape
    (3, 8)
  """
  _check_tables(x_xC, down_ExC, up_ExC, keys_HkX2xNxK2)
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is unknown; allowed: {sorted(ACTIVATIONS)}")
  q_xHxK, keys = peer_queries(x_xC, query_CxHxK, keys_HkX2xNxK2, query_gain_HxK, key_gain_Hkx2xK2)
  scores_xHxk, idx_xHxk = product_key_topk(q_xHxK, keys, top_k, backend=topk)  # 3. [..., H, k]
  g_xHxk = peer_gates(scores_xHxk, gate)  # 4.
  lead, heads = idx_xHxk.shape[:-2], idx_xHxk.shape[-2]
  idx_xL = idx_xHxk.reshape(*lead, heads * top_k)  # [..., L]
  u_xLxC = jnp.take(down_ExC, idx_xL, axis=0).astype(x_xC.dtype)  # 5. [..., L, C]
  h_xL = jnp.einsum("...c,...lc->...l", x_xC, u_xLxC, preferred_element_type=jnp.float32)
  w_xL = g_xHxk.reshape(*lead, heads * top_k) * ACTIVATIONS[activation](h_xL)  # [..., L] fp32
  if backend == "auto" and jax.sharding.get_abstract_mesh().size > 1:
    backend = "xla"
  out_xC = embedding_bag(up_ExC, idx_xL, w_xL, backend=backend)  # 6. [..., C]
  return PEEROutput(out_xC.astype(x_xC.dtype), idx_xHxk, g_xHxk)


def peer_forward_reference(x_xC, query_CxHxK, keys_HkX2xNxK2, down_ExC, up_ExC, *, top_k: int,
                           activation: str = "gelu", gate: str = "softmax", query_gain_HxK=None,
                           key_gain_Hkx2xK2=None) -> PEEROutput:
  """Brute force (O(E) per token): every expert scored as the product-key sum, one exact
  ``jax.lax.top_k`` over all E, every expert applied through dense [..., E] weights. The oracle
  of ``peer_forward`` for tests (same arguments, no backends)."""
  _check_tables(x_xC, down_ExC, up_ExC, keys_HkX2xNxK2)
  q_xHxK, keys = peer_queries(x_xC, query_CxHxK, keys_HkX2xNxK2, query_gain_HxK, key_gain_Hkx2xK2)
  scores_xHxk, idx_xHxk = product_key_topk_reference(q_xHxK, keys, top_k)  # all n*n sums, exact top-k
  g_xHxk = peer_gates(scores_xHxk, gate)
  e = down_ExC.shape[0]
  h_xE = jnp.einsum("...c,ec->...e", x_xC.astype(jnp.float32), down_ExC.astype(jnp.float32))  # every expert
  chosen_xE = jnp.einsum("...hk,...hke->...e", g_xHxk, jax.nn.one_hot(idx_xHxk, e, dtype=jnp.float32))
  out_xC = jnp.einsum("...e,ec->...c", chosen_xE * ACTIVATIONS[activation](h_xE), up_ExC.astype(jnp.float32))
  return PEEROutput(out_xC.astype(x_xC.dtype), idx_xHxk, g_xHxk)


class PEER(nnx.Module):
  """A PEER feed-forward [..., C] -> [..., C] (``PEERConfig``), a thin owner of its parameters.

  Parameters: ``query`` [C, H, Dk] (Xavier-uniform), ``keys`` [Hk, 2, n, Dk/2] (U(+-a), a =
  ``key_init_scale`` or Dk^-1/2), ``down`` and ``up`` [E, C] (N(0, s), s = ``expert_init_std`` or
  C^-1/2), with qk-norm the gains ``query_gain`` [H, Dk] and ``key_gain`` [Hk, 2, Dk/2] (ones).
  Random streams in that order. ``layer(x)`` is the output; ``layer.read(x)`` the ``PEEROutput``.

  Example:
    >>> cfg = PEERConfig(num_experts=64, heads=2, top_k=4, key_dim=8)
    >>> layer = PEER(16, cfg, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 5, 16))).shape
    (2, 5, 16)
  """

  def __init__(self, dim: int, config: PEERConfig, *, rngs: nnx.Rngs):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
      raise ValueError(f"PEER dim={dim!r} must be a positive int")
    self.dim, self.config = dim, config
    c, h, hk, dk, n, e = dim, config.heads, config.key_heads, config.key_dim, config.n_keys, config.num_experts
    limit = (6.0 / (c + h * dk)) ** 0.5
    self.query = param(jax.random.uniform(rngs.params(), (c, h, dk), jnp.float32, -limit, limit),
                       ax.EMBED, ax.MEM_HEADS, ax.MEM_KEY_DIM)
    a = config.key_init_scale if config.key_init_scale is not None else dk**-0.5
    self.keys = param(jax.random.uniform(rngs.params(), (hk, 2, n, dk // 2), jnp.float32, -a, a),
                      ax.MEM_HEADS, ax.MEM_HALVES, ax.MEM_KEYS, ax.MEM_KEY_DIM)
    std = config.expert_init_std if config.expert_init_std is not None else c**-0.5
    self.down = normal_param(rngs, (e, c), std, ax.EXPERTS, ax.EMBED)
    self.up = normal_param(rngs, (e, c), std, ax.EXPERTS, ax.EMBED)
    if config.qk_norm:
      self.query_gain = param(jnp.ones((h, dk), jnp.float32), ax.MEM_HEADS, ax.MEM_KEY_DIM)
      self.key_gain = param(jnp.ones((hk, 2, dk // 2), jnp.float32), ax.MEM_HEADS, ax.MEM_HALVES, ax.MEM_KEY_DIM)

  def arrays(self) -> dict:
    """The parameters as ``peer_forward``'s keyword arrays (gains only with qk-norm)."""
    out = {"query_CxHxK": self.query[...], "keys_HkX2xNxK2": self.keys[...], "down_ExC": self.down[...],
           "up_ExC": self.up[...]}
    if self.config.qk_norm:
      out.update(query_gain_HxK=self.query_gain[...], key_gain_Hkx2xK2=self.key_gain[...])
    return out

  def read(self, x) -> PEEROutput:
    """The forward pass with the retrieval: ``PEEROutput(out [..., C], indices, gates)``."""
    if x.shape[-1] != self.dim:
      raise ValueError(f"x.shape={x.shape}: last dim must be the layer's dim={self.dim}")
    cfg = self.config
    return peer_forward(x, **self.arrays(), top_k=cfg.top_k, activation=cfg.activation, gate=cfg.gate,
                        topk=cfg.topk, backend=cfg.backend)

  def __call__(self, x):
    """[..., C] -> [..., C]."""
    return self.read(x).out
