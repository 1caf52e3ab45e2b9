"""Baseline of ``configs/finetune_smf.py``: the same data and optimizer (at lr 1e-3), rank-8 LoRA adapters on the
attention and dense FFN matrices (every base parameter and value row frozen).

  python train.py --config=configs/finetune_lora.py --config.finetune.init_from=runs/default \
      --workdir=runs/finetune_lora
"""

from configs import finetune_smf


def get_config():
  c = finetune_smf.get_config()
  c.finetune.method = "lora"
  c.finetune.lr = 1e-3  # Adam; 0.03 (smf's rate) would move every matrix far
  c.finetune.lora_rank = 8
  return c
