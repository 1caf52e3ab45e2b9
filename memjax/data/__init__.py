"""memjax.data: datasets, tokenizers, the input pipeline and the QA evaluation.

* ``knowledge``: a synthetic knowledge base (TFDS builder ``memjax_knowledge``): people, facts,
  paraphrased biographies, QA pairs.
* ``local_text``: any local text from a glob (TFDS builder ``memjax_local_text``).
* ``tokenizers``: byte-level and BPE (SentencePiece) tokenizers behind one interface.
* ``pipeline``: Grain pipeline (shard, shuffle, tokenize, pack, batch, resumable) and
  ``make_pipeline``, the one entry point a trainer calls.
* ``qa``: ``qa_exact_match`` by batched greedy decoding.

Every bad input raises ``DataError`` (a ``ValueError``) with a one-line message naming it.
"""

from memjax.data.config import DataConfig, default_data_dir
from memjax.data.errors import DataError
from memjax.data.knowledge import (ATTRIBUTES, KB_SIZES, MemjaxKnowledge, knowledge_builder_config,
                                   make_entities, prepare_knowledge, qa_pairs)
from memjax.data.local_text import (SUPPORTED_SUFFIXES, VALIDATION_FRACTION, MemjaxLocalText,
                                    local_text_builder_config, prepare_local_text)
from memjax.data.pipeline import BATCH_KEYS, Pipeline, batch_dataset, document_chunks, make_pipeline, prepare_data
from memjax.data.qa import QAItem, answer_matches, load_qa_items, normalize_answer, qa_exact_match, read_qa_jsonl
from memjax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer,
                                    train_bpe)

__all__ = [
    "ATTRIBUTES",
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "KB_SIZES",
    "MemjaxKnowledge",
    "MemjaxLocalText",
    "Pipeline",
    "QAItem",
    "SUPPORTED_SUFFIXES",
    "SentencePieceTokenizer",
    "Tokenizer",
    "VALIDATION_FRACTION",
    "answer_matches",
    "batch_dataset",
    "default_data_dir",
    "document_chunks",
    "knowledge_builder_config",
    "load_qa_items",
    "load_tokenizer",
    "local_text_builder_config",
    "make_entities",
    "make_pipeline",
    "normalize_answer",
    "prepare_data",
    "prepare_knowledge",
    "prepare_local_text",
    "qa_exact_match",
    "qa_pairs",
    "read_qa_jsonl",
    "train_bpe",
]
