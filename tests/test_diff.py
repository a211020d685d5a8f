"""moeq2gguf diff: which tensors and metadata of two files of one model differ, with numbers a user can act on."""
from __future__ import annotations

import json

import pytest

from moeq2gguf import Moeq2ggufError, cli, convert, diff
from util import FIXTURES

MODEL = FIXTURES / "mixtral-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diff")
    q8 = convert(MODEL, tmp / "q8.gguf", type="Q8_0", progress=False).output
    again = convert(MODEL, tmp / "again.gguf", type="Q8_0", progress=False).output
    mixed = convert(MODEL, tmp / "mixed.gguf", type="Q8_0", tensor_types=["blk\\.1\\.ffn_down_exps=Q4_0"],
                    progress=False).output
    return q8, again, mixed


def test_identical_conversions(files):
    q8, again, _ = files
    result = diff(q8, again)
    assert result.identical and result.n_tensors > 10


def test_one_overridden_tensor_is_found(files, capsys):
    q8, _, mixed = files
    result = diff(q8, mixed)
    assert [t.name for t in result.tensors] == ["blk.1.ffn_down_exps.weight"]
    t = result.tensors[0]
    assert (t.type_a, t.type_b, t.bytes_differing_pct) == ("Q8_0", "Q4_0", None)
    assert 0.01 < t.max_rel_diff < 0.5          # Q4_0 against Q8_0 of the same weights
    assert cli.main(["diff", str(q8), str(mixed), "--json"]) in (0, None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["identical"] is False and doc["tensors"][0]["name"] == "blk.1.ffn_down_exps.weight"


def test_other_models_are_refused(files, tmp_path):
    q8, _, _ = files
    other = convert(FIXTURES / "qwen2moe-tiny", tmp_path / "other.gguf", type="Q8_0", progress=False).output
    with pytest.raises(Moeq2ggufError, match="hold different tensors"):
        diff(q8, other)
