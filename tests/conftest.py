"""Test-wide JAX settings: implicit rank promotion is an error, so shape bugs fail loudly."""

import os
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import pytest


@pytest.fixture(params=["jit", "eager"])
def variant(request):
  """Runs a test once under ``jax.jit`` and once eagerly (like ``chex.variants(with_jit, without_jit)``)."""
  if request.param == "jit":
    return jax.jit
  return lambda f, **kwargs: f
