"""The accelerators memjax compiles for ahead of time, and their facts: one table, with sources.

A ``Target`` names a slice or host (``"v5p-8"``, ``"h100-8"``): the platform, the topology string
that ``jax.experimental.topologies.get_topology_desc`` takes, and per-chip facts used to judge a
compiled step (does it fit, what step time and MFU the compiler's estimate implies).

Sources of the per-chip figures (dense bf16 peak; HBM capacity and bandwidth):
  TPU v5e  197 TFLOP/s, 16 GiB, 819 GB/s      cloud.google.com/tpu/docs/v5e (system architecture table)
  TPU v5p  459 TFLOP/s, 95 GiB, 2765 GB/s     cloud.google.com/tpu/docs/v5p
  TPU v6e  918 TFLOP/s, 32 GiB, 1640 GB/s     cloud.google.com/tpu/docs/v6e (1638 GB/s on the page,
                                              1640 in JAX's own table; we use 1640)
  H100 SXM 989 TFLOP/s, 79.1 GiB usable, 3.35 TB/s   NVIDIA H100 datasheet (dense, without sparsity);
                                              memory size and bandwidth from XLA's h100_sxm.txtpb
  H200     989 TFLOP/s, 140.3 GiB usable, 4.8 TB/s   NVIDIA H200 datasheet; memory from XLA's h200.txtpb
TPU slice names count TensorCores for v5p (``v5p-8`` = 4 chips) and chips for v5e / v6e
(``v5e-16`` = 16 chips), as Google Cloud names them.

Example:
  >>> t = TARGETS["v5p-8"]
  >>> t.platform, t.chips, t.topology
  ('tpu', 4, 'v5p:2x2x1')
"""

from __future__ import annotations

import dataclasses
import os

GiB = 2**30
_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target: ``platform`` ("tpu" | "cuda"), ``topology`` (for ``get_topology_desc``),
  ``chips`` (devices), and per chip ``hbm_bytes``, ``peak_flops`` (dense bf16), ``hbm_bandwidth``
  (bytes/s); GPU targets name their ``GpuTargetConfig`` text proto in ``spec``."""

  name: str
  platform: str
  topology: str
  chips: int
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  spec: str | None = None

  def spec_text(self) -> str | None:
    if self.spec is None:
      return None
    with open(os.path.join(_SPECS, self.spec)) as f:
      return f.read()


def _tpu(name, topology, chips, hbm_gib, peak, bw):
  return Target(name, "tpu", topology, chips, int(hbm_gib * GiB), peak, bw)


def _gpu(name, spec, hosts, per_host, hbm_bytes, peak, bw):
  return Target(name, "cuda", f"1x{hosts}x{per_host}", hosts * per_host, hbm_bytes, peak, bw, spec)


TARGETS: dict[str, Target] = {t.name: t for t in [
    _tpu("v5e-4", "v5e:2x2", 4, 16, 197e12, 819e9),
    _tpu("v5e-16", "v5e:4x4", 16, 16, 197e12, 819e9),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95, 459e12, 2765e9),
    _tpu("v5p-16", "v5p:2x2x2", 8, 95, 459e12, 2765e9),
    _tpu("v5p-64", "v5p:4x4x2", 32, 95, 459e12, 2765e9),
    _tpu("v5p-512", "v5p:8x8x4", 256, 95, 459e12, 2765e9),
    _tpu("v6e-4", "v6e:2x2", 4, 32, 918e12, 1640e9),
    _tpu("v6e-16", "v6e:4x4", 16, 32, 918e12, 1640e9),
    _gpu("h100-1", "h100_sxm.txtpb", 1, 1, 84_942_979_072, 989e12, 3.35e12),
    _gpu("h100-4", "h100_sxm.txtpb", 1, 4, 84_942_979_072, 989e12, 3.35e12),
    _gpu("h100-8", "h100_sxm.txtpb", 1, 8, 84_942_979_072, 989e12, 3.35e12),
    _gpu("h100-16", "h100_sxm.txtpb", 2, 8, 84_942_979_072, 989e12, 3.35e12),
    _gpu("h200-1", "h200.txtpb", 1, 1, 150_652_141_568, 989e12, 4.8e12),
    _gpu("h200-8", "h200.txtpb", 1, 8, 150_652_141_568, 989e12, 4.8e12),
]}


def get(name: str) -> Target:
  """The target called ``name``; ``ValueError`` listing the known ones otherwise."""
  if name not in TARGETS:
    raise ValueError(f"--target={name!r} is not a known target; allowed: {sorted(TARGETS)}")
  return TARGETS[name]


def devices(target: Target):
  """The target's devices, from the accelerator's own compiler (deviceless: no hardware needed).

  Needs that compiler in this Python: ``jax[tpu]`` (libtpu) for TPU, ``jax[cuda12]`` for GPU (run with
  ``JAX_PLATFORMS=cpu``); raises ``RuntimeError`` saying how to get it otherwise.
  """
  from jax.experimental import topologies
  try:
    if target.platform == "tpu":
      topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    else:
      topo = topologies.get_topology_desc(platform="cuda", target_config=target.spec_text(),
                                          topology=target.topology)
  except Exception as e:  # noqa: BLE001 - no plugin / no libtpu
    extra = "aot-tpu" if target.platform == "tpu" else "aot-cuda"
    raise RuntimeError(
        f"target {target.name} needs the {target.platform.upper()} compiler in this Python "
        f"({' '.join(str(e).split())[:120]}): install memjax with the '{extra}' extra in its own venv "
        f"(pip install -e '.[{extra}]'), or use the python that `bash .ci/aot_env.sh {target.platform}` prints") from None
  return list(topo.devices)
