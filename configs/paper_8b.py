"""An 8B base with Memory+ of 16M slots (the paper's 8B run): 32 layers, C = 4096, memory+ at layers
4, 12, 20 sharing one pool of 4096^2 slots (H 4, k 32, Dk 2048 = C/2, Dv 4096), a 128k vocabulary."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 128256
  c.model.dim = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.head_dim = 128
  c.model.mlp_dim = 14336
  c.model.tie_embeddings = False
  c.model.memory.layers = "4,12,20"
  c.model.memory.n_keys = 4096
  c.model.memory.heads = 4
  c.model.memory.k = 32
  c.model.memory.key_dim = 2048
  c.model.memory.value_dim = 4096
  c.model.memory.swilu = True
  c.model.memory.shared = True
  c.train.batch_size = 256
  c.train.seq_len = 4096
  return c
