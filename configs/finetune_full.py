"""Baseline of ``configs/finetune_smf.py``: the same data and optimizer, every parameter trained.

  python train.py --config=configs/finetune_full.py --config.finetune.init_from=runs/default \
      --workdir=runs/finetune_full
"""

from configs import finetune_smf


def get_config():
  c = finetune_smf.get_config()
  c.finetune.method = "full"
  return c
