"""MoE baseline: the FFNs at Memory+'s three layers become 8 top-1 routed SwiGLU experts (dense FLOPs)."""

from configs import dense


def get_config():
  c = dense.get_config()
  c.model.moe.layers = "centered:3"
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 1
  return c
