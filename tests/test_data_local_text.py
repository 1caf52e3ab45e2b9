"""Local text: stable hash splits, config names that follow the files, documents per file type."""

import os

from memjax.data import local_text as lt


def test_hash_split_is_stable_when_files_come_and_go():
  keys = [f"dir/file{i}.txt" for i in range(400)]
  before = lt.assign_splits(keys, 0.1)
  after = lt.assign_splits(keys[:150] + [f"new{i}.md" for i in range(50)] + keys[300:], 0.1)
  assert all(after[k] == before[k] for k in after if k in before)
  share = sum(v == "validation" for v in before.values()) / len(keys)
  assert 0.05 < share < 0.15  # ~ validation_fraction


def test_split_fixups_keep_both_splits_usable():
  assert set(lt.assign_splits(["a.txt", "b.txt"], 0.01).values()) == {"train", "validation"}
  assert lt.assign_splits(["only.txt"], 0.5) == {"only.txt": "train"}
  assert set(lt.assign_splits(["a.txt", "b.txt", "c.txt"], 0.0).values()) == {"train"}


def test_config_name_follows_the_glob_and_the_files(tmp_path):
  (tmp_path / "a.txt").write_text("one")
  glob = str(tmp_path / "*.txt")
  first = lt.local_text_builder_config(glob)
  assert first.name == lt.local_text_builder_config(glob).name and first.name.startswith("g")
  assert lt.local_text_builder_config(glob, validation_fraction=0.2).name != first.name
  (tmp_path / "b.txt").write_text("two")
  assert lt.local_text_builder_config(glob).name != first.name
  os.remove(tmp_path / "b.txt")
  (tmp_path / "a.txt").write_text("one, edited")
  assert lt.local_text_builder_config(glob).name != first.name


def test_documents_per_file_type(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "x.py").write_bytes(b"\xef\xbb\xbfprint('hi')\n")  # a BOM is dropped
  (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "  "}\n{"text": "b", "n": 1}\n')
  stats = lt.ScanStats()
  docs = [d for p in lt.match_files(str(tmp_path / "**" / "*")) for d in lt.iter_documents(p, str(tmp_path), stats)]
  assert docs == [("d.jsonl#L1", "a"), ("d.jsonl#L4", "b"), ("sub/x.py", "print('hi')\n")]
  assert stats.empty == 1 and stats.undecodable == 0
  assert lt.glob_root(str(tmp_path / "**" / "*")) == str(tmp_path)
