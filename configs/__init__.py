"""Run configurations: ``base.py`` (every key, its default) and experiments as short diffs of it.

An installed package (``pip install -e .``), so ``from configs import base`` works from any directory.
"""
