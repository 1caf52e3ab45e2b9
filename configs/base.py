"""The base config: every key with its default. Other configs are short diffs of this one.

The keys and their defaults are defined once, by the dataclasses of ``memjax/config.py`` (their
docstrings say what each field means); this file is ``Config()`` as an ``ml_collections.ConfigDict``.
To see every key and its default::

  python -c "from configs import base; print(base.get_config())"

With no flags, ``python train.py`` uses ``configs/default.py`` (a small Memory+ model on the synthetic
knowledge base, a few minutes on 2 CPU cores).
"""

from memjax.config_bridge import base_configdict


def get_config():
  return base_configdict()
