"""Sparse memory finetuning of a trained run on new facts (``config.finetune``, docs/continual.md).

  python train.py --config=configs/finetune_smf.py --config.finetune.init_from=runs/default \
      --workdir=runs/finetune_smf

The model (and its tokenizer) come from ``finetune.init_from``; this file gives only the data, the
optimizer and the finetune settings. The data are the facts of another knowledge-base world
(``data.kb_seed=1``: new people), so the QA exact match at the end measures what was learnt.
Baselines: ``configs/finetune_full.py`` (every parameter), ``configs/finetune_lora.py`` (adapters),
``configs/finetune_memory.py`` (every value row).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.finetune.init_from = "runs/default"
  c.finetune.method = "smf"
  c.finetune.top_t = 500
  # The paper prefers SGD; here SGD at lr 0.1 or 30 left the model unchanged to 3 digits in 200 steps (the
  # value gradients of a mean token loss are tiny), so Adam at the pretraining value rate (docs/continual.md).
  c.finetune.optimizer = "adam"
  c.finetune.lr = 0.03
  c.finetune.background_batches = 16
  c.data.kb_seed = 1  # facts B: a world of new people
  c.train.steps = 200
  c.train.eval_every = 0
  c.train.checkpoint_every = 100
  return c
