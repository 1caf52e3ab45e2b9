"""Top-k routed mixture of SwiGLU experts, the paper's MoE baseline: pure helpers, then a thin module.

Shapes:  N tokens (flattened B*T)   C width   E experts   K experts per token   F expert hidden
         S = capacity per expert = ceil(capacity_factor * N * K / E)

Routing algorithm:
  1. probs [N, E] = softmax(x W_router) in fp32.
  2. Each token picks its top-K experts; their probabilities, renormalised to sum 1, are the gates.
  3. Assignments are numbered within each expert in token order; those past capacity S are dropped
     (the token gets nothing from that expert).
  4. Each expert runs its SwiGLU on its [S, C] slice (a batched einsum over E).
  5. A token's output is the gate-weighted sum of its kept experts' outputs.
  Load balancing (Switch Transformer): loss = E * sum_e f_e * P_e, with f_e the fraction of
  assignments routed to e and P_e the mean router probability of e; 1 when balanced, E when all
  tokens go to one expert.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import MoEConfig
from memjax.nn import normal_param
from memjax.sharding import EMBED, EXPERTS, MLP


def route(logits_NxE, top_k: int):
  """Steps 1-2: (probs [N, E] fp32, gates [N, K] fp32 summing to 1, experts [N, K] int32)."""
  probs = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  gates, experts = jax.lax.top_k(probs, top_k)
  gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return probs, gates, experts.astype(jnp.int32)


def balance_loss(probs_NxE, experts_NxK):
  """Switch load-balancing loss E * sum_e f_e P_e (1 = balanced, E = collapsed)."""
  e = probs_NxE.shape[-1]
  counts_E = jnp.zeros((e,), jnp.float32).at[experts_NxK.reshape(-1)].add(1.0)
  f_E = counts_E / experts_NxK.size
  p_E = jnp.mean(probs_NxE, axis=0)
  return e * jnp.sum(f_E * p_E)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def dispatch_slots(experts_NxK, num_experts: int, cap: int):
  """Step 3: the slot (expert * S + position) of every assignment, or E*S when dropped: [N, K]."""
  flat_A = experts_NxK.reshape(-1)
  onehot_AxE = jax.nn.one_hot(flat_A, num_experts, dtype=jnp.int32)
  position_A = jnp.sum((jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE, axis=-1)
  slot_A = jnp.where(position_A < cap, flat_A * cap + position_A, num_experts * cap)
  return slot_A.reshape(experts_NxK.shape)


def moe_forward(x_NxC, router_CxE, w_gate_ExCxF, w_up_ExCxF, w_down_ExFxC, *, top_k: int,
                capacity_factor: float):
  """Steps 1-5: (out [N, C], balance loss scalar, fraction of assignments dropped)."""
  n, c = x_NxC.shape
  e = router_CxE.shape[1]
  cap = capacity(n, e, top_k, capacity_factor)
  probs, gates_NxK, experts_NxK = route(x_NxC @ router_CxE.astype(x_NxC.dtype), top_k)
  slots_NxK = dispatch_slots(experts_NxK, e, cap)
  token_NxK = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], slots_NxK.shape)
  # Which token fills each expert slot (N = the zero row for empty slots).
  token_of_slot = jnp.full((e * cap,), n, jnp.int32).at[slots_NxK.reshape(-1)].set(
      token_NxK.reshape(-1), mode="drop")
  x_pad = jnp.concatenate([x_NxC, jnp.zeros((1, c), x_NxC.dtype)], axis=0)
  xe_ExSxC = x_pad[token_of_slot].reshape(e, cap, c)
  dt = x_NxC.dtype
  h = jax.nn.silu(jnp.einsum("esc,ecf->esf", xe_ExSxC, w_gate_ExCxF.astype(dt)))
  h = h * jnp.einsum("esc,ecf->esf", xe_ExSxC, w_up_ExCxF.astype(dt))
  ye_ExSxC = jnp.einsum("esf,efc->esc", h, w_down_ExFxC.astype(dt))
  ye_pad = jnp.concatenate([ye_ExSxC.reshape(e * cap, c), jnp.zeros((1, c), dt)], axis=0)
  out_NxKxC = ye_pad[slots_NxK]  # dropped assignments read the zero row
  out_NxC = jnp.einsum("nk,nkc->nc", gates_NxK.astype(dt), out_NxKxC)
  dropped = jnp.mean((slots_NxK == e * cap).astype(jnp.float32))
  return out_NxC, balance_loss(probs, experts_NxK), dropped


class MoE(nnx.Module):
  """Routed SwiGLU experts: [..., C] -> ([..., C], weighted balancing loss)."""

  def __init__(self, dim: int, cfg: MoEConfig, mlp_dim: int, num_layers: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, f = cfg.num_experts, mlp_dim
    self.router = normal_param(rngs, (dim, e), dim**-0.5, EMBED, EXPERTS)
    self.w_gate = normal_param(rngs, (e, dim, f), dim**-0.5, EXPERTS, EMBED, MLP)
    self.w_up = normal_param(rngs, (e, dim, f), dim**-0.5, EXPERTS, EMBED, MLP)
    self.w_down = normal_param(rngs, (e, f, dim), f**-0.5 / (2 * num_layers) ** 0.5, EXPERTS, MLP, EMBED)

  def __call__(self, x, *, dropless: bool = False):
    """``dropless``: capacity = the number of tokens (E / K as capacity factor), so no token is dropped
    and a token's output does not depend on the other tokens of the call (generation uses it)."""
    lead, c = x.shape[:-1], x.shape[-1]
    factor = self.cfg.num_experts / self.cfg.top_k if dropless else self.cfg.capacity_factor
    out, loss, _ = moe_forward(x.reshape(-1, c), self.router[...], self.w_gate[...], self.w_up[...],
                               self.w_down[...], top_k=self.cfg.top_k, capacity_factor=factor)
    return out.reshape(*lead, c), self.cfg.aux_loss_weight * loss
