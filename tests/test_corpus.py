import hashlib
import json

import pytest

from moeq2gguf.calib import corpus


def test_split_rule_matches_bench_definition():
    root = corpus.stdlib_root()
    for split in corpus.SPLITS:
        files = corpus.stdlib_files(split)
        assert files, split
        for path in files[:50]:
            rel = path.relative_to(root).as_posix()
            bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10
            assert {0: "eval", 1: "calib"}.get(bucket, "train") == split
            assert "site-packages" not in rel


def test_splits_are_disjoint_and_cover_the_stdlib():
    sets = {s: set(corpus.stdlib_files(s)) for s in corpus.SPLITS}
    assert not sets["eval"] & sets["calib"] and not sets["eval"] & sets["train"] and not sets["calib"] & sets["train"]
    every = {p for p in corpus.stdlib_root().rglob("*.py") if "site-packages" not in p.parts}
    assert set().union(*sets.values()) == every


def test_split_is_deterministic():
    assert corpus.read_text("eval") == corpus.read_text("eval")
    assert corpus.stdlib_files("calib") == sorted(corpus.stdlib_files("calib"))


def test_user_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(corpus.iter_texts(str(tmp_path / "a.txt"))) == ["hello world"]
    assert list(corpus.iter_texts(str(tmp_path / "b.jsonl"))) == ["one", "two"]
    assert list(corpus.iter_texts(str(tmp_path))) == ["hello world", "one", "two"]


def test_user_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(corpus.iter_texts(str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string \"text\" field"):
        list(corpus.iter_texts(str(bad)))
    with pytest.raises(ValueError, match="unknown split"):
        corpus.stdlib_files("test")
