"""Byte and BPE tokenizers: round trips on non-ASCII text, special ids, save/load."""

import json

import pytest

from memjax.data import tokenizers as tk
from memjax.data.errors import DataError

TEXTS = [
    "Mara Ivel was born in Kraków on 4 May 1987.",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂 and ✓.",
    "def f(x):\n\treturn x  # two  spaces\n",
    " leading and trailing spaces  ",
    "",
]

CORPUS = [
    "Mara Ivel was born in Lyon. Mara Ivel studied at Oxford.",
    "Tomas Reid works for Norvex. Tomas Reid plays the cello.",
    "Grüße aus Köln. Ça va? Ελληνικά κείμενα.",
    "def add(a, b):\n    return a + b\n",
] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  tok = tk.train_bpe(CORPUS, 400)
  path = tmp_path_factory.mktemp("bpe") / "bpe.model"
  tok.save(path)
  return tk.load_tokenizer(path)


def test_byte_round_trip_and_ids():
  tok = tk.ByteTokenizer()
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (259, 0, 1, 2)
  assert tok.decode([tok.bos_id, *tok.encode("hé"), tok.eos_id, tok.pad_id]) == "hé"
  assert isinstance(tok, tk.Tokenizer)


def test_bpe_round_trip_on_non_ascii_and_unseen_text(bpe):
  assert isinstance(bpe, tk.SentencePieceTokenizer) and isinstance(bpe, tk.Tokenizer)
  for text in TEXTS + ["Unseen: Ångström, Žižek, 한국어, \u00a0nbsp"]:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text, text
  assert (bpe.pad_id, bpe.eos_id, bpe.bos_id) == (0, 1, 2)
  # Specials are never produced by encode, and decode drops them.
  assert not {0, 1, 2} & set(bpe.encode(" ".join(TEXTS)))
  assert bpe.decode([bpe.bos_id] + bpe.encode("Köln") + [bpe.eos_id]) == "Köln"
  # BPE actually merges: frequent words are shorter than their bytes.
  assert len(bpe.encode("Mara Ivel was born in Lyon.")) < len("Mara Ivel was born in Lyon.") // 2


def test_bpe_training_is_deterministic_and_tokenizers_pickle(bpe):
  import pickle

  assert tk.train_bpe(CORPUS, 400)._proto == tk.train_bpe(CORPUS, 400)._proto
  again = pickle.loads(pickle.dumps(bpe))
  assert again.encode(TEXTS[1]) == bpe.encode(TEXTS[1])
  assert pickle.loads(pickle.dumps(tk.ByteTokenizer())).encode("é") == [198, 172]


def test_save_load_round_trip(tmp_path, bpe):
  tk.ByteTokenizer().save(tmp_path / "byte.json")
  assert isinstance(tk.load_tokenizer(tmp_path / "byte.json"), tk.ByteTokenizer)
  bpe.save(tmp_path / "again.model")
  again = tk.load_tokenizer(tmp_path / "again.model")
  assert again.vocab_size == bpe.vocab_size and again.encode(TEXTS[1]) == bpe.encode(TEXTS[1])


def test_tokenizer_errors_are_one_line_and_name_the_file(tmp_path):
  bad = tmp_path / "garbage.model"
  bad.write_bytes(b"\x00\x01 not a model")
  with pytest.raises(DataError, match="garbage.model") as err:
    tk.load_tokenizer(bad)
  assert "\n" not in str(err.value)
  with pytest.raises(DataError, match="missing.model"):
    tk.load_tokenizer(tmp_path / "missing.model")
  with pytest.raises(DataError, match=r"vocab_size=100 must be an int >= 320"):
    tk.train_bpe(CORPUS, 100)
  with pytest.raises(DataError, match="empty corpus"):
    tk.train_bpe(["", "  \n "], 400)


# ----- tokenizer files: sentencepiece:PATH and hf:PATH ----------------------------------------

FILE_TEXTS = ["Mara Ivel was born in Lyon.", "Grüße aus Köln, 日本語 ✓", "def f(x):\n  return x", "a  b   c"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A SentencePiece model trained here with SentencePiece's own defaults for ids (unk 0, bos 1,
  eos 2, no pad), as most published models have."""
  import sentencepiece as spm

  d = tmp_path_factory.mktemp("sp")
  (d / "corpus.txt").write_text("\n".join(CORPUS))
  spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=400,
                                 model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                 add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2,
                                 hard_vocab_limit=False)
  return d / "sp.model"


def build_hf_json(path, specials, vocab_size=400):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path))
  return path


def test_sentencepiece_file_round_trip_and_ids_from_the_model(sp_model):
  import pickle

  tok = tk.tokenizer_from_file(f"sentencepiece:{sp_model}")
  assert isinstance(tok, tk.Tokenizer) and tok.kind == "sentencepiece"
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id == tok.eos_id  # no pad piece: pad with eos
  assert tok.vocab_size >= 259  # 256 byte pieces + specials, and a few merges
  for text in FILE_TEXTS:
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode_array(text).tolist() == ids
  assert tok.decode([tok.bos_id, *tok.encode("Köln"), tok.eos_id]) == "Köln"
  assert pickle.loads(pickle.dumps(tok)).encode(FILE_TEXTS[1]) == tok.encode(FILE_TEXTS[1])


def test_hf_tokenizer_json_round_trip_and_special_tokens(tmp_path):
  import pickle

  path = build_hf_json(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
  tok = tk.tokenizer_from_file(f"hf:{path}")
  assert tok.kind == "hf" and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in TEXTS + FILE_TEXTS:
    ids = tok.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert tok.decode(ids) == text, text
  assert tok.decode([1, *tok.encode("Köln"), 2]) == "Köln"
  assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[1]) == tok.encode(TEXTS[1])
  assert tk.tokenizer_from_file(f"hf:{tmp_path}").eos_id == 2  # a directory holding tokenizer.json


def test_hf_special_tokens_from_tokenizer_config(tmp_path):
  """GPT-2 style: one special token, named by tokenizer_config.json; bos and pad fall back to it."""
  path = build_hf_json(tmp_path / "tokenizer.json", ["<|endoftext|>", "<|user|>"])
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|user|>"}, "bos_token": null}')
  tok = tk.tokenizer_from_file(f"hf:{path}")
  user = tok._tok.token_to_id("<|user|>")
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (user, user, user) and user == 1
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
  with pytest.raises(DataError, match=r"names eos_token='<nope>', which is not in the vocabulary"):
    tk.tokenizer_from_file(f"hf:{path}")


def test_tokenizer_file_errors_are_one_line(tmp_path, sp_model):
  hf = build_hf_json(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
  no_eos = build_hf_json(tmp_path / "noeos" / "tokenizer.json" if (tmp_path / "noeos").mkdir() is None else None,
                         ["<unk>"])
  cases = [
      (f"hf:{tmp_path}/missing.json", r"tokenizer='hf:.*missing.json': cannot read .*No such file"),
      (f"sentencepiece:{tmp_path}/missing.model", r"cannot read .*missing.model"),
      (f"hf:{sp_model}", r"sp.model' is not a tokenizer.json \(not UTF-8 JSON; for a SentencePiece model use"),
      (f"sentencepiece:{hf}", r"tokenizer.json' is JSON, not a SentencePiece model \(for a tokenizer.json use 'hf:"),
      (f"hf:{no_eos}", r"has no eos token"),
  ]
  (tmp_path / "garbage.json").write_text('{"not": "a tokenizer"}')
  cases.append((f"hf:{tmp_path}/garbage.json", r"garbage.json' is not a Hugging Face tokenizer.json"))
  for spec, match in cases:
    with pytest.raises(DataError, match=match) as err:
      tk.tokenizer_from_file(spec)
    assert "\n" not in str(err.value) and spec in str(err.value), str(err.value)


def test_pipeline_pads_with_the_files_pad_id(tmp_path):
  """A tokenizer whose pad is not 0: padded inputs hold its pad id, out of the loss and attention."""
  from memjax.data import make_pipeline

  path = build_hf_json(tmp_path / "tok" / "tokenizer.json" if (tmp_path / "tok").mkdir() is None else None,
                       ["<s>", "</s>", "<pad>"])
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:4]))
  pipe = make_pipeline(seq_len=64, batch_size=4, source=f"jsonl:{tmp_path}/c/*.jsonl", tokenizer=f"hf:{path}",
                       data_dir=tmp_path / "d", process_index=0, process_count=1)
  assert (pipe.tokenizer.bos_id, pipe.tokenizer.eos_id, pipe.tokenizer.pad_id) == (0, 1, 2)
  assert pipe.tokenizer_path == str(path)
  batch = next(pipe.train)
  pad = batch["segment_ids"] == 0
  assert pad.any() and (batch["inputs"][pad] == 2).all() and (batch["loss_mask"][pad] == 0).all()
  first = (batch["positions"] == 0) & ~pad
  assert (batch["inputs"][first] == 0).all()  # every document starts with the file's bos
  assert set(batch["targets"][~pad].tolist()) >= {1}  # and ends with its eos
