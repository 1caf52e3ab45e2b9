"""Two small TFDS helpers shared by the builders (private)."""

from __future__ import annotations

import tensorflow_datasets as tfds


def code_path_of(module_file: str):
  """A ``code_path`` class attribute for builders that live in a package module.

  TFDS 4.9.10's own ``code_path`` checks ``importlib_resources.abc.Traversable``, importing the
  ``importlib_resources`` backport that it only requires on Python < 3.9, so a builder defined in a
  package fails with ModuleNotFoundError on 3.11. Setting the attribute skips that lookup.
  """
  from etils import epath

  return epath.Path(module_file)


def quiet_prepare(builder: tfds.core.DatasetBuilder) -> None:
  """``download_and_prepare`` without TFDS's progress bars (their setting is restored afterwards)."""
  from tensorflow_datasets.core.utils import tqdm_utils

  was_active = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(was_active)
