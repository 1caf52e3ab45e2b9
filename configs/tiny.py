"""A seconds-long run for tests, notebooks and smoke checks: a 2-block Memory+ model on the tiny KB."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.memory.layers = "1"
  c.model.memory.n_keys = 16
  c.model.memory.heads = 2
  c.model.memory.k = 4
  c.model.memory.key_dim = 16
  c.model.memory.value_dim = 32
  c.train.steps = 8
  c.train.batch_size = 8
  c.train.seq_len = 64
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.data.kb = "tiny"
  c.eval.qa_max_items = 16
  c.eval.qa_batch_size = 16
  c.eval.eval_batches = 1
  return c
