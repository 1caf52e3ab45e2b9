"""Tests of this directory run on 8 fake CPU devices, in their own pytest process per module.

``tests/test_multidevice.py`` starts them with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(which must be set before JAX is imported) and ``MEMJAX_MULTIDEVICE=1``; run one by hand with::

  MEMJAX_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m pytest -q tests/multidevice/test_equivalence.py
"""

import jax
import pytest

DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  if jax.device_count() != DEVICES:
    pytest.fail(f"tests/multidevice needs {DEVICES} fake devices (XLA_FLAGS="
                f"--xla_force_host_platform_device_count={DEVICES} before JAX is imported); have {jax.device_count()}")
