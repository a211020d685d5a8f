"""The i-quant mixes end to end (issue 23): given the same importance matrix, `--type IQ.. --imatrix FILE` writes
llama-quantize's file byte for byte on both bundled models; moequant quantizes them (its i-quant tensors by ggml's
search on its affinity-weighted statistics: no GPTQ into the codebooks yet) and its file runs in llama.cpp, with the
KLD printed next to llama.cpp imatrix's; rtn without an importance matrix is refused, as llama-quantize refuses it."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.calib import calibrate, corpus
from moeq2gguf.eval.perplexity import evaluate_many
from moeq2gguf.runtime.llama_tools import llama_tool, run_tool
from util import FIXTURES


@pytest.fixture(scope="module", params=["qwen2moe-tiny", "mixtral-tiny"])
def model(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = FIXTURES / request.param
    base = convert(path, tmp / "f32.gguf", type="F32", progress=False).output
    imatrix = calibrate(path, imatrix_out=str(tmp / "imatrix.gguf"), calib_windows=8, calib_ctx=256,
                        progress=False).imatrix.output
    return request.param, path, base, imatrix, tmp


# two cases within the suite's time budget: the four mixes on both models are byte-identical in tools/bench_quality.py's
# notes (BENCHMARKS.md, "Below 3 bits", 2026-12-06), and the mixes' types are checked in tests/test_mixes.py
CASES = [("qwen2moe-tiny", "IQ2_M"), ("mixtral-tiny", "IQ1_M")]


@pytest.mark.parametrize("model, mix", CASES, indirect=["model"])
def test_imatrix_files_are_llama_quantizes(model, mix):
    name, path, base, imatrix, tmp = model
    ours = convert(path, tmp / f"{mix}.gguf", type=mix, imatrix=str(imatrix), progress=False).output
    theirs = tmp / f"{mix}-llama.gguf"
    run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix, base, theirs, mix, "1"])
    a = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    assert any(t in (gguf.GGMLQuantizationType.IQ2_XXS, gguf.GGMLQuantizationType.IQ2_S,
                     gguf.GGMLQuantizationType.IQ3_XXS, gguf.GGMLQuantizationType.IQ1_M) for t, _ in a.values())


@pytest.mark.parametrize("model", ["qwen2moe-tiny"], indirect=True)   # mixtral-tiny: 0.931x on 2026-12-06
def test_moequant_at_iq2_xxs_runs_and_is_measured(model, one_thread):
    name, path, base, imatrix, tmp = model
    theirs = tmp / "IQ2_XXS-llama.gguf"
    if not theirs.exists():
        run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix, base, theirs, "IQ2_XXS", "1"])
    result = convert(path, tmp / "moequant.gguf", type="IQ2_XXS", method="moequant", calib_windows=4, calib_ctx=256,
                     progress=False)
    methods = {t["method"] for t in result.report.tensors.values()}
    assert methods == {"moequant", "rtn"}   # GPTQ into the lattices for the i-quant tensors too; token_embd is RTN
    text = tmp / "eval.txt"
    text.write_text(corpus.read_text("eval")[:60_000])
    ours, llama = evaluate_many([result.output, theirs], base, str(text), ctx=256, chunks=8, progress=False)
    print(f"{name} IQ2_XXS mean KLD: moequant {ours.kld_mean:.4f}, llama.cpp imatrix {llama.kld_mean:.4f}, "
          f"ratio {ours.kld_mean / llama.kld_mean:.3f}")
    assert ours.kld_mean <= 1.25 * llama.kld_mean   # a guard against breakage; the ratio is printed


def test_rtn_without_an_imatrix_is_refused(tmp_path):
    with pytest.raises(Moeq2ggufError, match="quantizes only with an importance matrix"):
        convert(FIXTURES / "mixtral-tiny", tmp_path / "m.gguf", type="IQ2_XXS", progress=False)
    assert not any(tmp_path.iterdir())
