"""The base config: every key with its default. Other configs are short diffs of this one.

With no flags, ``python train.py`` uses ``configs/default.py`` (a small Memory+ model on the synthetic
knowledge base, a few minutes on 2 CPU cores).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0 = the tokenizer's vocabulary size
  c.model.dim = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512
  c.model.rope_theta = 10000.0
  c.model.dtype = "float32"
  c.model.tie_embeddings = True

  c.model.memory = ml_collections.ConfigDict()
  c.model.memory.layers = ""  # "" = no memory; "4,12,20"; "centered:3"
  c.model.memory.n_keys = 64
  c.model.memory.heads = 4
  c.model.memory.k = 16
  c.model.memory.key_dim = 64
  c.model.memory.value_dim = 128
  c.model.memory.swilu = True
  c.model.memory.qk_norm = False
  c.model.memory.gated = False
  c.model.memory.value_dtype = "float32"
  c.model.memory.key_init_scale = ml_collections.config_dict.placeholder(float)
  c.model.memory.value_init_std = ml_collections.config_dict.placeholder(float)
  c.model.memory.out_init_std = ml_collections.config_dict.placeholder(float)
  c.model.memory.shared = True
  c.model.memory.value_sharding = "column"  # "column" | "row"
  c.model.memory.value_update = "sparse"  # "sparse" | "dense"
  c.model.memory.backend = "auto"  # embedding_bag backend

  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.layers = ""
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.mlp_dim = 0  # 0 = model.mlp_dim
  c.model.moe.capacity_factor = 1.25
  c.model.moe.aux_loss_weight = 0.01

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.value_lr = 0.0  # 0 = value_lr_mult * lr
  c.train.value_lr_mult = 10.0
  c.train.warmup_steps = 50
  c.train.decay = "linear"  # "linear" | "cosine" | "constant"
  c.train.final_lr_frac = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.1
  c.train.value_weight_decay = 0.0
  c.train.clip = 1.0
  c.train.value_clip = 1.0
  c.train.seed = 0
  c.train.checkpoint_every = 200  # 0 = only at the end
  c.train.eval_every = 200  # 0 = only at the end
  c.train.log_every = 10
  c.train.max_checkpoints = 3
  c.train.nan_policy = "stop"  # "stop" | "skip"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.memory = 1

  c.data = ml_collections.ConfigDict()
  c.data.kb = "small"
  c.data.kb_seed = 0
  c.data.text_glob = ml_collections.config_dict.placeholder(str)
  c.data.validation_fraction = 0.05
  c.data.tokenizer = "byte"
  c.data.bpe_vocab_size = 1024
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.seed = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.qa_jsonl = ml_collections.config_dict.placeholder(str)
  c.eval.qa_from_kb = True
  c.eval.qa_max_items = 512
  c.eval.qa_batch_size = 64
  c.eval.qa_max_answer_tokens = 0  # 0 = one more than the longest answer
  c.eval.qa_seq_len = 64  # QA decoding window; 0 = train.seq_len
  c.eval.eval_batches = 4
  return c
