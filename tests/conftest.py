"""Test-wide JAX settings: implicit rank promotion is an error, so shape bugs fail loudly."""

import os
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Runs compile the same programs again and again (each train() call builds new closures); a
# persistent compilation cache shared by the test process and its subprocesses saves minutes.
CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

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
