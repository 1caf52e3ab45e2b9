"""Baseline of ``configs/finetune_smf.py``: the same data and optimizer (at lr 1e-3), every parameter trained.

  python train.py --config=configs/finetune_full.py --config.finetune.init_from=runs/default \
      --workdir=runs/finetune_full
"""

from configs import finetune_smf


def get_config():
  c = finetune_smf.get_config()
  c.finetune.method = "full"
  c.finetune.lr = 1e-3  # Adam; 0.03 (smf's rate) would move every matrix far
  return c
