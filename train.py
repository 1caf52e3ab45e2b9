"""Train a memjax language model: ``python train.py [--config=configs/X.py] [--config.<key>=VALUE ...]``.

The command lives in ``memjax/train/main.py`` (flags, exit codes); ``python train.py --help`` lists them.
"""

from memjax.train.main import cli

if __name__ == "__main__":
  cli()
