"""Runs each module of ``tests/multidevice/`` in its own pytest process with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is imported)."""

import os
import pathlib
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

MODULES = sorted(p.name for p in (pathlib.Path(__file__).parent / "multidevice").glob("test_*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_multidevice_module(module, tmp_path):
  env = subprocess_env(MEMJAX_MULTIDEVICE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8",
                       JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path}",
                        os.path.join("tests", "multidevice", module)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=1200)
  assert out.returncode == 0, f"tests/multidevice/{module} failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
