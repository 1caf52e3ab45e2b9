"""PEER: the dense family's middle FFN replaced by one PEER block of 128^2 = 16,384 single-neuron
experts, 8 heads x top-16 (128 experts per token), about the dense model's FLOPs per token."""

from configs import dense


def get_config():
  c = dense.get_config()
  c.model.peer.layers = "centered:1"
  c.model.peer.num_experts = 128 * 128
  c.model.peer.heads = 8
  c.model.peer.top_k = 16
  c.model.peer.key_dim = 64
  c.model.peer.qk_norm = True
  return c
