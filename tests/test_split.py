"""Split output as llama.cpp writes it: OUT-00001-of-0000N.gguf with the split.* keys; llama-cpp-python loads it from
the first part and computes the single file's logits; a bad split request is refused."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from moeq2gguf import convert, runtime
from moeq2gguf.errors import Moeq2ggufError

FIXTURE = Path(__file__).resolve().parents[1] / "moeq2gguf" / "fixtures" / "qwen2moe-tiny"


def test_split_in_three_parts_runs_like_the_single_file(tmp_path):
    single = convert(FIXTURE, tmp_path / "one.gguf", type="Q4_K_M", progress=False).output
    split = convert(FIXTURE, tmp_path / "m.gguf", type="Q4_K_M", split_max_tensors=30, progress=False)
    parts = sorted(p.name for p in tmp_path.glob("m-*.gguf"))
    assert parts == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)] and split.output.name == parts[0]
    assert not list(tmp_path.glob(".*"))   # no temporary file left
    first = gguf.GGUFReader(split.output).fields
    assert first["split.count"].contents() == 3 and first["split.tensors.count"].contents() == 71
    tokens = list(range(5, 69))
    with runtime.load(single) as a, runtime.load(split.output) as b:
        np.testing.assert_array_equal(runtime.logits(a, tokens), runtime.logits(b, tokens))


def test_split_by_size_and_bad_requests(tmp_path):
    split = convert(FIXTURE, tmp_path / "s.gguf", type="Q4_K_M", split_max_size="3MB", progress=False)
    parts = sorted(tmp_path.glob("s-*.gguf"))
    assert len(parts) >= 2 and all(p.stat().st_size < 4 * 10**6 for p in parts)
    assert split.output == parts[0]
    with pytest.raises(Moeq2ggufError, match="--split-max-size 'big' is not a size"):
        convert(FIXTURE, tmp_path / "x.gguf", type="Q4_K_M", split_max_size="big", progress=False)
    with pytest.raises(Moeq2ggufError, match="a size target bounds one file"):
        convert(FIXTURE, tmp_path / "x.gguf", target_size="5MB", split_max_tensors=10, progress=False)


def test_inspect_eval_and_bench_take_a_split_file(tmp_path):
    from moeq2gguf import inspect
    from moeq2gguf.eval import evaluate
    from moeq2gguf.runtime.bench import bench_file
    single = convert(FIXTURE, tmp_path / "one.gguf", type="Q4_K_M", progress=False).output
    split = convert(FIXTURE, tmp_path / "m.gguf", type="Q4_K_M", split_max_tensors=30, progress=False).output
    one, parts = inspect(single), inspect(split)
    assert [t.name for t in parts.tensors] == [t.name for t in one.tensors] and parts.n_bytes == one.n_bytes
    f32 = convert(FIXTURE, tmp_path / "f32.gguf", type="F32", progress=False).output
    a, b = (evaluate(q, f32, "eval", ctx=128, chunks=2, progress=False) for q in (single, split))
    assert a.kld_mean == b.kld_mean and a.ppl_quant == b.ppl_quant
    rows = bench_file(split, threads=(1,), ctx=32, gen=4, repeats=1)
    assert rows[0].pp_tok_s > 0
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(Moeq2ggufError, match="m-00002-of-00003.gguf is missing"):
        inspect(split)
