"""Causal self-attention over packed documents: the plain-jnp reference and the fused kernels.

``model.attention`` (``ATTENTION_IMPLS``) picks how ``memjax.model.Attention`` computes
softmax(q k^T / sqrt(Dh)) v over keys at or before each query and in the same document:

  einsum      (default) ``attention_reference``: the [B, N, T, T] logits in fp32, masked, softmax.
  xla         ``jax.nn.dot_product_attention(implementation="xla")`` (the same math, JAX's code).
  cudnn       ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused flash attention
              (NVIDIA GPUs; bf16 compute only, as cuDNN requires). The document mask is passed as
              ``mask`` beside ``is_causal=True``.
  pallas_tpu  JAX's Pallas flash-attention kernel for TPU (``jax.experimental.pallas.ops.tpu.
              flash_attention``) with the segment ids, so no [T, T] mask exists; needs T a multiple
              of 128. Under a mesh it runs inside ``jax.shard_map`` over the batch's mesh axes (Mosaic
              kernels cannot be partitioned automatically).
  auto        per the platform of the devices the step is compiled for
              (``jax.lax.platform_dependent``, never the host's default backend): cudnn on CUDA when
              the compute dtype is bf16, pallas_tpu on TPU when T is a multiple of 128, else einsum.

The default stays "einsum" because ``memjax.plan``'s activation model was fitted to compiles of it
(it keeps the [T, T] probabilities; the fused kernels keep none): set ``model.attention="auto"`` on
accelerators, and compile (``python -m memjax.compile``) rather than plan to size such a run.

Every implementation takes and returns [B, T, N, Dh] and agrees with the reference to float
rounding (tests/test_attention.py; the TPU kernel in ``interpret`` mode is not exercised on CPU, it is
compiled for TPU targets by tests/test_compile.py).

Example:
  >>> q = k = v = jnp.ones((1, 4, 2, 8))
  >>> attention(q, k, v, jnp.ones((1, 4), jnp.int32), impl="einsum").shape
  (1, 4, 2, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax import sharding
from memjax.config import ATTENTION_IMPLS

__all__ = ["ATTENTION_IMPLS", "attention", "attention_mask", "attention_reference", "masked_attention"]
_FLASH_BLOCK = 128  # the TPU kernel's default block along T


def attention_mask(segment_ids_BxT):
  """[B, 1, T, T] bool: causal, and within one document when segment ids are given."""
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxT[None] & same_BxTxT)[:, None]


def masked_attention(q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, mask_Bx1xTxS):
  """Softmax attention of T queries over S keys (masked-out keys get zero weight): the reference math,
  logits and softmax in fp32 -> [B, T, N, Dh] in the inputs' dtype."""
  dt = q_BxTxNxD.dtype
  scale = q_BxTxNxD.shape[-1] ** -0.5
  logits_BxNxTxS = jnp.einsum("btnd,bsnd->bnts", q_BxTxNxD, k_BxSxNxD, preferred_element_type=jnp.float32)
  logits_BxNxTxS = jnp.where(mask_Bx1xTxS, logits_BxNxTxS * scale, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxNxTxS, axis=-1).astype(dt)
  return jnp.einsum("bnts,bsnd->btnd", probs, v_BxSxNxD)


def attention_reference(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT):
  """Causal attention within documents, the plain-jnp way (``masked_attention`` + ``attention_mask``)."""
  return masked_attention(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, attention_mask(segment_ids_BxT))


def _same_segment(segment_ids_BxT):
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def _dot_product(q, k, v, segment_ids_BxT, implementation: str):
  return jax.nn.dot_product_attention(q, k, v, mask=_same_segment(segment_ids_BxT), is_causal=True,
                                      implementation=implementation)


def _cudnn_or_reference(q, k, v, segment_ids_BxT):
  # platform_dependent traces every branch; JAX refuses to trace the cuDNN call in a process where it
  # finds no cuDNN (a CPU- or TPU-only install), and such a process cannot compile for CUDA either.
  try:
    return _dot_product(q, k, v, segment_ids_BxT, "cudnn")
  except RuntimeError as e:
    if "cuDNN" not in str(e):
      raise
    return attention_reference(q, k, v, segment_ids_BxT)


def _flash_tpu(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  def local(q, k, v, seg):
    t = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's layout is [B, N, T, Dh]
    out = fa.flash_attention(t(q), t(k), t(v), segment_ids=fa.SegmentIds(q=seg, kv=seg), causal=True,
                             sm_scale=q.shape[-1] ** -0.5)
    return t(out)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size <= 1:
    return local(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT)
  batch = sharding.spec_for((q_BxTxNxD.shape[0],), (sharding.BATCH,), sharding.axis_rules(), mesh)[0]
  P = jax.sharding.PartitionSpec
  qkv = P(batch, None, None, None)
  return jax.shard_map(local, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                       check_vma=False)(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT)


def attention(q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT, *, impl: str = "einsum"):
  """Causal attention within documents ([B, T, N, Dh] each, ``segment_ids`` [B, T] int) -> [B, T, N, Dh]
  by the implementation ``impl`` (see the module doc). Raises ValueError for an unknown ``impl``."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r}; allowed: {list(ATTENTION_IMPLS)}")
  args = (q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, segment_ids_BxT)
  if impl == "einsum":
    return attention_reference(*args)
  if impl == "xla":
    return _dot_product(*args, "xla")
  if impl == "cudnn":
    return _dot_product(*args, "cudnn")
  if impl == "pallas_tpu":
    return _flash_tpu(*args)
  cuda = _cudnn_or_reference if q_BxTxNxD.dtype == jnp.bfloat16 else attention_reference
  tpu = _flash_tpu if q_BxTxNxD.shape[1] % _FLASH_BLOCK == 0 else attention_reference
  return jax.lax.platform_dependent(*args, default=attention_reference, cuda=cuda, tpu=tpu)
