"""The paper's 373M-base Memory+ (Berges et al. 2024): 24 layers, C = 1024, memory+ at layers 4, 12, 20
sharing one pool of 1024^2 slots (H 4, k 32, Dk 512, Dv 1024), a 32k vocabulary."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 32000
  c.model.dim = 1024
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.mlp_dim = 4096
  c.model.memory.layers = "4,12,20"
  c.model.memory.n_keys = 1024
  c.model.memory.heads = 4
  c.model.memory.k = 32
  c.model.memory.key_dim = 512
  c.model.memory.value_dim = 1024
  c.model.memory.swilu = True
  c.model.memory.shared = True
  c.train.batch_size = 64
  c.train.seq_len = 2048
  return c
