"""Baseline of ``configs/finetune_smf.py``: the same data and optimizer, every value row trained
(and nothing else): memory finetuning without the tf-idf selection.

  python train.py --config=configs/finetune_memory.py --config.finetune.init_from=runs/default \
      --workdir=runs/finetune_memory
"""

from configs import finetune_smf


def get_config():
  c = finetune_smf.get_config()
  c.finetune.method = "memory"
  return c
