"""Memory+: three memory+ layers (swilu) centred with a large stride, one shared pool of 128^2 slots."""

from configs import memory


def get_config():
  c = memory.get_config()
  c.model.memory.layers = "centered:3"
  c.model.memory.swilu = True
  c.model.memory.shared = True
  return c
