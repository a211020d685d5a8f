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


def test_pydoc_splits_partition_the_documentation_prose():
    """pydoc-eval/calib/train: disjoint pieces of pydoc_data.topics that together hold every topic's text, each split
    with about its share (eval and calib 5-20% of the characters), pieces cut at paragraph ends."""
    from pydoc_data.topics import topics
    pieces = corpus.pydoc_pieces()
    assert len({key for key, _ in pieces}) == len(pieces)
    for name in topics:   # a topic's pieces rejoin to its text
        assert "\n\n".join(t for key, t in pieces if key.rsplit("/", 1)[0] == name) == topics[name]
    sizes = {s: len(corpus.read_text(s, separator="")) for s in corpus.PYDOC_SPLITS}
    total = sum(len(t) for _, t in pieces)
    assert sum(sizes.values()) == total
    assert 0.05 < sizes["pydoc-eval"] / total < 0.2 and 0.05 < sizes["pydoc-calib"] / total < 0.2, sizes
    assert list(corpus.iter_texts("pydoc-eval")) == list(corpus.iter_pydoc("pydoc-eval"))
    with pytest.raises(corpus.TextSourceError, match="pydoc-eval"):
        list(corpus.iter_pydoc("eval"))


def test_mixed_calibration_holds_both_domains_from_the_start():
    import itertools
    first = list(itertools.islice(corpus.iter_mixed(), 20))
    code = set(corpus.iter_split("calib"))
    prose = set(corpus.iter_pydoc("pydoc-calib"))
    n_code, n_prose = sum(len(t) for t in first if t in code), sum(len(t) for t in first if t in prose)
    assert all(t in code or t in prose for t in first) and n_code > 0 and n_prose > 0
    assert sorted(corpus.iter_mixed()) == sorted([*corpus.iter_split("calib"), *corpus.iter_pydoc("pydoc-calib")])


def test_default_calibration_is_ebss_on_one_gpu_else_the_stdlib_split(monkeypatch):
    """convert without --calib: EBSS on a GPU (it won out of domain), the stdlib calib split on CPU (EBSS generation
    is too slow there) and under torchrun (not distributed yet)."""
    from moeq2gguf.config import ConvertConfig, default_calib
    assert default_calib("cuda", 1) == "ebss" and default_calib("cuda:1", 1) == "ebss"
    assert default_calib("cpu", 1) == "calib" and default_calib("cuda", 2) == "calib"
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert default_calib("cuda") == "calib"
    monkeypatch.delenv("WORLD_SIZE")
    assert default_calib("cuda") == "ebss"
    assert ConvertConfig(type="Q4_K_M", method="moequant").quant.calib == "calib"
    assert ConvertConfig(type="Q4_K_M", method="moequant", calib="pydoc-calib").quant.calib == "pydoc-calib"
