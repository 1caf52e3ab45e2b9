"""Byte and BPE tokenizers: round trips on non-ASCII text, special ids, save/load."""

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
