"""The paper's 1.3B base (Table 1) with Memory+ of 1M slots: 24 layers, C = 2048, memory+ at layers
4, 12, 20 sharing one pool of 1024^2 slots (H 4, k 32, Dk 1024 = C/2, Dv 2048 = C), a 32k vocabulary.

Assumed where the paper does not say: a Llama-like block (16 heads of 128, SwiGLU of 4C = 8192), and a
global batch of 256 x 2048 tokens (0.5M tokens per step)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 32000
  c.model.dim = 2048
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.head_dim = 128
  c.model.mlp_dim = 8192
  c.model.memory.layers = "4,12,20"
  c.model.memory.n_keys = 1024
  c.model.memory.heads = 4
  c.model.memory.k = 32
  c.model.memory.key_dim = 1024
  c.model.memory.value_dim = 2048
  c.model.memory.swilu = True
  c.model.memory.shared = True
  c.train.batch_size = 256
  c.train.seq_len = 2048
  return c
