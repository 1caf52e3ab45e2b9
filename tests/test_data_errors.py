"""Every clear data error: one line, a ValueError, naming the glob / file and line / field."""

import re

import numpy as np
import pytest

from memjax.data import DataConfig, DataError, make_pipeline, prepare_local_text, qa_exact_match, read_qa_jsonl
from memjax.data.tokenizers import ByteTokenizer


def raises_one_line(match, fn, *args, **kwargs):
  with pytest.raises(DataError, match=match) as err:
    fn(*args, **kwargs)
  assert isinstance(err.value, ValueError)
  assert "\n" not in str(err.value), str(err.value)
  return str(err.value)


def test_glob_matching_nothing_names_the_glob(tmp_path):
  glob = str(tmp_path / "nowhere" / "*.txt")
  raises_one_line(re.escape(f"text_glob='{glob}' matched no files"), make_pipeline, seq_len=8, batch_size=1,
                  text_glob=glob, data_dir=tmp_path, process_index=0, process_count=1)


def test_glob_matching_only_unsupported_files(tmp_path):
  (tmp_path / "a.pdf").write_bytes(b"%PDF")
  raises_one_line(r"matched 1 files but none with a supported suffix \['.txt', '.md', '.py', '.jsonl'\]",
                  prepare_local_text, tmp_path / "data", str(tmp_path / "*"))


def test_empty_corpus_names_the_glob(tmp_path):
  (tmp_path / "a.txt").write_text("   \n")
  (tmp_path / "b.jsonl").write_text('{"text": ""}\n\n')
  glob = str(tmp_path / "*")
  msg = raises_one_line(r"gives an empty corpus: 2 files matched", prepare_local_text, tmp_path / "data", glob)
  assert glob in msg and "2 empty" in msg


def test_undecodable_bytes_are_skipped_and_counted(tmp_path):
  corpus = tmp_path / "c"
  corpus.mkdir()
  (corpus / "good.txt").write_text("plain UTF-8 text, é")
  (corpus / "other.md").write_text("more text")
  (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (corpus / "mixed.jsonl").write_bytes(b'{"text": "ok line"}\n{"text": "bad \xff"}\n')
  builder = prepare_local_text(tmp_path / "data", str(corpus / "*"))
  meta = builder.info.metadata
  assert meta["skipped_undecodable"] == 2
  assert meta["skipped_paths"] == ["latin1.txt", "mixed.jsonl:2"]
  texts = {builder.as_data_source(s)[i]["text"].decode()
           for s in builder.info.splits for i in range(builder.info.splits[s].num_examples)}
  assert texts == {"plain UTF-8 text, é", "more text", "ok line"}
  # Only undecodable files: nothing left, an empty-corpus error that says why.
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\x00")
  raises_one_line(r"empty corpus.*1 skipped for undecodable bytes", prepare_local_text, tmp_path / "data",
                  str(tmp_path / "bad" / "*.txt"))


def test_malformed_corpus_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "fine"}\n["not", "an object"]\n')
  raises_one_line(re.escape(f'{path}:2: expected a JSON object with a string "text" field'),
                  prepare_local_text, tmp_path / "data", str(path))


@pytest.mark.parametrize("lines,lineno,what", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "c", "answer": "d"', ""], 2, "not valid JSON"),
    (['{"prompt": "a", "answer": "b"}', "", '{"prompt": "c"}'], 3, 'field "answer" must be a string'),
    (['{"prompt": "a", "answer": " "}'], 1, 'field "answer" is empty'),
    (['["a", "b"]'], 1, "expected a JSON object"),
])
def test_malformed_qa_file_names_file_and_line(tmp_path, lines, lineno, what):
  path = tmp_path / "qa.jsonl"
  path.write_text("\n".join(lines))
  msg = raises_one_line(what, read_qa_jsonl, path)
  assert msg.startswith(f"{path}:{lineno}: ")
  # make_pipeline checks the QA file before building anything.
  raises_one_line(re.escape(f"{path}:{lineno}: "), make_pipeline, seq_len=8, batch_size=1, kb="tiny", qa_jsonl=path,
                  data_dir=tmp_path / "data", process_index=0, process_count=1)
  assert not (tmp_path / "data").exists()


def test_missing_or_empty_qa_file(tmp_path):
  raises_one_line("cannot read QA file .*missing.jsonl", read_qa_jsonl, tmp_path / "missing.jsonl")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  raises_one_line("empty.jsonl' has no items", read_qa_jsonl, tmp_path / "empty.jsonl")


@pytest.mark.parametrize("kwargs,field", [
    (dict(kb="huge"), r"DataConfig.kb='huge' is not a knowledge-base size; allowed: \['tiny', 'small', 'medium', 'large', 'world_countries', 'world_small', 'world_medium', 'world_large', 'numbers_tiny', 'numbers_small', 'numbers_medium', 'numbers_large'\]"),
    (dict(tokenizer="wordpiece"), r"DataConfig.tokenizer='wordpiece' is not supported; allowed: \['byte', 'bpe', 'sentencepiece:PATH', 'hf:PATH'\]"),
    (dict(bpe_vocab_size=100), r"DataConfig.bpe_vocab_size=100 must be an int >= 320"),
    (dict(bpe_vocab_size=512.0), r"DataConfig.bpe_vocab_size=512.0"),
    (dict(seed=-1), r"DataConfig.seed=-1 must be an int in \[0, 2\*\*32\)"),
    (dict(kb_seed=True), r"DataConfig.kb_seed=True"),
    (dict(text_glob=""), r"DataConfig.text_glob='' must be None"),
    (dict(validation_fraction=1.0), r"DataConfig.validation_fraction=1.0 must be a float in \[0, 1\)"),
    (dict(data_dir=""), r"DataConfig.data_dir=''"),
    (dict(source="csv:/a/*.csv"), r"DataConfig.source='csv:/a/\*.csv' must be None, 'tfds:NAME\[/CONFIG\]\[:VERSION\]', "
                                  r"'array_record:GLOB', 'parquet:GLOB' or 'jsonl:GLOB'"),
    (dict(source="jsonl:/a", text_glob="/b/*"), r"DataConfig.source='jsonl:/a' cannot be set together with text_glob"),
    (dict(source="jsonl:/a", mixture="jsonl:/b=1"), r"DataConfig.mixture=.* cannot be set together with source"),
    (dict(mixture="jsonl:/a=0"), r"DataConfig.mixture='jsonl:/a=0' must be None or 'SOURCE=WEIGHT"),
    (dict(tokens_key=""), r"DataConfig.tokens_key='' must be None"),
    (dict(text_key=""), r"DataConfig.text_key='' must be a non-empty string"),
    (dict(split="test", source="jsonl:/a/*.jsonl"), r"DataConfig.split='test' selects a TFDS split: it needs a tfds: source"),
    (dict(split="test"), r"DataConfig.split='test' selects a TFDS split"),
    (dict(workers=-1), r"DataConfig.workers=-1 must be an int in \[0, 256\]"),
    (dict(tokenizer="hf:"), r"DataConfig.tokenizer='hf:' is not supported"),
])
def test_bad_data_configs_name_the_field(kwargs, field):
  raises_one_line(field, DataConfig, **kwargs)


def test_make_pipeline_checks_its_own_arguments(tmp_path):
  common = dict(kb="tiny", data_dir=tmp_path, process_index=0, process_count=1)
  raises_one_line(r"seq_len=0 must be a positive int", make_pipeline, seq_len=0, batch_size=1, **common)
  raises_one_line(r"batch_size=2.0 must be a positive int", make_pipeline, seq_len=8, batch_size=2.0, **common)
  raises_one_line(r"DataConfig.tokenizer='chars'", make_pipeline, seq_len=8, batch_size=1, tokenizer="chars",
                  **common)


def test_qa_exact_match_argument_errors():
  tok = ByteTokenizer()
  fn = lambda t: np.zeros(t.shape + (tok.vocab_size,), np.float32)  # noqa: E731
  raises_one_line("needs at least one item", qa_exact_match, fn, [], tok)
  raises_one_line(r"max_answer_tokens=16 must be < seq_len=16", qa_exact_match, fn,
                  [{"prompt": "p", "answer": "a"}], tok, seq_len=16, max_answer_tokens=16)
