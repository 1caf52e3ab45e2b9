"""Dense baseline of the matched-FLOPs family: 6 blocks of width 128, SwiGLU FFNs everywhere."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.num_layers = 6
  c.train.steps = 1000
  return c
