"""memjax: scalable product-key memory layers for JAX and Flax NNX.

The public API is re-exported here; see README.md for a tour. ``generate`` is
``memjax.generation.generate`` (``python -m memjax.generate`` is its command line). ``load_exported`` (which pulls in Orbax)
is imported on first use.
"""

from memjax.config import GenerateConfig, MemoryConfig, PEERConfig, VALUE_DTYPES
from memjax.generation import Generation, generate, generate_stream, generate_text
from memjax.kernels.embedding_bag import BACKENDS, embedding_bag, embedding_bag_reference, embedding_bag_row_grads
from memjax.memory.layer import MemoryOutput, MemoryValue, ProductKeyMemory, ValueTable, shared_memory_layers
from memjax.memory.product_keys import product_key_topk, product_key_topk_reference
from memjax.memory.read import MemoryReadout, memory_read, qk_normalize
from memjax.metrics import USAGE_KEYS, bits_stored, memory_usage, slot_mass
from memjax.peer import PEER, PEEROutput, peer_forward, peer_forward_reference

__version__ = "0.1.0"

_LAZY = {"load_exported": "memjax.train.checkpoint"}


def __getattr__(name: str):
  if name in ("inspect", "edit"):  # the submodules memjax.inspect (memory introspection) and memjax.edit
    import importlib                # (writing and erasing facts), imported on first use
    return importlib.import_module(f"memjax.{name}")
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'memjax' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "GenerateConfig",
    "Generation",
    "MemoryConfig",
    "MemoryOutput",
    "MemoryReadout",
    "MemoryValue",
    "PEER",
    "PEERConfig",
    "PEEROutput",
    "ProductKeyMemory",
    "USAGE_KEYS",
    "VALUE_DTYPES",
    "ValueTable",
    "embedding_bag",
    "embedding_bag_reference",
    "embedding_bag_row_grads",
    "generate",
    "generate_stream",
    "generate_text",
    "load_exported",
    "memory_read",
    "memory_usage",
    "bits_stored",
    "peer_forward",
    "peer_forward_reference",
    "product_key_topk",
    "product_key_topk_reference",
    "qk_normalize",
    "shared_memory_layers",
    "slot_mass",
]
