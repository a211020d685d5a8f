"""Quantized export of every family: --method rtn byte-identical to llama-quantize; calibrated
methods refuse the families whose calibration forward is not implemented, by name."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.llama_tools import llama_quantize
from moeq2gguf.testing import random_model, save_checkpoint

FAMILIES = {
    "qwen3moe": dict(hidden_size=256),
    "olmoe": dict(hidden_size=256),
    "deepseek_v3": dict(hidden_size=256),
    "gpt_oss": dict(hidden_size=256),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory, small_tokenizers):
    tmp = tmp_path_factory.mktemp(request.param)
    model = random_model(request.param, **FAMILIES[request.param])
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp / "ckpt")


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K"])
def test_rtn_is_byte_identical_to_llama_quantize(checkpoint, mix, tmp_path):
    base = convert(checkpoint, tmp_path / "f32.gguf", type="F32", progress=False).output
    ours = convert(checkpoint, tmp_path / "ours.gguf", type=mix, progress=False).output
    theirs = llama_quantize(base, tmp_path / "theirs.gguf", mix)
    a = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


def test_calibrated_methods_refuse_unimplemented_families(checkpoint, tmp_path):
    with pytest.raises(Moeq2ggufError, match="cannot calibrate .* yet .*use --method rtn"):
        convert(checkpoint, tmp_path / "q.gguf", type="Q4_K_M", method="gptq", progress=False)
    assert not (tmp_path / "q.gguf").exists()
