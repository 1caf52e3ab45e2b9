"""Memory: the dense family's middle FFN replaced by one plain memory layer (no swilu), 128^2 slots."""

from configs import dense


def get_config():
  c = dense.get_config()
  c.model.memory.layers = "centered:1"
  c.model.memory.swilu = False
  c.model.memory.n_keys = 128
  c.model.memory.heads = 4
  c.model.memory.k = 32
  c.model.memory.key_dim = 128
  return c
