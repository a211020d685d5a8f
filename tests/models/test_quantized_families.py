"""Quantized export of every family: --method rtn byte-identical to llama-quantize; --method moequant
calibrates every family (nn's layer forward) and its file runs in llama.cpp."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import convert
from moeq2gguf.eval.perplexity import evaluate_many
from moeq2gguf.runtime.llama_tools import llama_quantize
from testing import random_deepseek_moe, random_model, save_checkpoint, save_mxfp4_gpt_oss

FAMILIES = {
    "mixtral": dict(hidden_size=256),
    "qwen2moe": dict(hidden_size=256),
    "deepseek": dict(hidden_size=256),
    "deepseek_v2": dict(hidden_size=256),
    "qwen3moe": dict(hidden_size=256),
    "olmoe": dict(hidden_size=256),
    "deepseek_v3": dict(hidden_size=256),
    "gpt_oss": dict(hidden_size=256),
    "glm4moe": dict(hidden_size=256),
    "minimax_m2": dict(hidden_size=256),
    "qwen35moe": dict(hidden_size=256),
    "llama4": dict(hidden_size=256),
    "ernie4_5_moe": dict(hidden_size=256),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory, small_tokenizers):
    tmp = tmp_path_factory.mktemp(request.param)
    family = request.param
    model = random_deepseek_moe(**FAMILIES[family]) if family == "deepseek" else random_model(family, **FAMILIES[family])
    return save_checkpoint(model, small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"], tmp / "ckpt")


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K"])
def test_rtn_is_byte_identical_to_llama_quantize(checkpoint, mix, tmp_path):
    base = convert(checkpoint, tmp_path / "f32.gguf", type="F32", progress=False).output
    ours = convert(checkpoint, tmp_path / "ours.gguf", type=mix, progress=False).output
    theirs = llama_quantize(base, tmp_path / "theirs.gguf", mix)
    a = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


# every family's calibration forward: dense leading layers (deepseek, V2-Lite), MLA with per-head
# attn_k_b/attn_v_b statistics, V3's grouped sigmoid routing, gpt-oss's sinks, windows and biases
CALIBRATED = ("deepseek", "deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4moe", "gpt_oss", "llama4", "minimax_m2", "mixtral", "olmoe",
              "qwen2moe", "qwen35moe", "qwen3moe")


@pytest.mark.parametrize("family", CALIBRATED)
def test_moequant_calibrates_every_family(family, tmp_path, small_tokenizers, eval_text, one_thread):
    """moequant runs on every family, puts every quantized layer tensor through GPTQ on its own
    statistics (each below RTN's error on them), reports coverage for routed experts only, and its file
    loads in llama.cpp with a mean KLD against the F32 file within 1.5x RTN's. Measured on these models
    (8 x 128 calibration tokens, 2026-12-06): 0.95-1.13x RTN's KLD. The KLD of random tiny models hardly reacts to
    what calibration sees (measured on such models: routing calibration tokens to the wrong experts moved
    it by at most 7%, replacing every observed input by noise by at most 25%), so this bound only guards
    the whole path against gross breakage; that the statistics are the runtime's inputs and routing
    weights is pinned exactly by tests/test_nn.py.
    With 2 x 64 tokens (fewer than n_embd = 256) GPTQ's Hessians are rank-deficient: 1.0-1.25x RTN."""
    model = random_deepseek_moe(hidden_size=256, num_hidden_layers=2) if family == "deepseek" else \
        random_model(family, hidden_size=256)
    ckpt = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "ckpt")
    calib, text = tmp_path / "calib.txt", tmp_path / "eval.txt"   # disjoint slices of the eval split
    calib.write_text(eval_text[-40_000:])
    text.write_text(eval_text[:20_000])
    f32 = convert(ckpt, tmp_path / "f32.gguf", type="F32", progress=False).output
    rtn = convert(ckpt, tmp_path / "rtn.gguf", type="Q4_K_M", progress=False).output
    result = convert(ckpt, tmp_path / "moequant.gguf", type="Q4_K_M", method="moequant", calib=str(calib),
                     calib_windows=8, calib_ctx=128, progress=False)
    quantized = {n: t for n, t in result.report.tensors.items()
                 if n.startswith("blk.") and t["type"] not in ("F32", "F16", "MXFP4")}
    assert quantized and all(t["method"] == "moequant" for t in quantized.values()), quantized
    assert all(t["recon_error"] <= t["recon_error_rtn"] for t in quantized.values())
    assert result.report.coverage and all("_exps." in n for n in result.report.coverage)
    ours, baseline = evaluate_many([result.output, rtn], f32, str(text), ctx=128, chunks=4, progress=False)
    print(f"{family}: mean KLD moequant {ours.kld_mean:.4f}, rtn {baseline.kld_mean:.4f}")
    assert ours.kld_mean <= 1.5 * baseline.kld_mean


def test_moequant_keeps_mxfp4_experts(tmp_path, small_tokenizers, eval_text, one_thread):
    """Released GPT-OSS ships MXFP4 experts: calibration copies their blocks byte for byte (as the
    float and rtn paths do), computes with their exact values, and quantizes everything else."""
    from moeq2gguf.models.gpt_oss import mxfp4_to_ggml
    from util import eval_tokens, llama_logits

    model = random_model("gpt_oss", hidden_size=256)
    path = tmp_path / "mxfp4"
    raw = {key: mxfp4_to_ggml(*blocks_scales) for key, blocks_scales in
           save_mxfp4_gpt_oss(model, small_tokenizers["qwen2moe"], path).items()}
    calib = tmp_path / "calib.txt"
    calib.write_text(eval_text[-40_000:])

    result = convert(path, tmp_path / "q.gguf", type="Q4_K_M", method="moequant", calib=str(calib),
                     calib_windows=4, calib_ctx=128, progress=False)
    written = {t.name: t for t in gguf.GGUFReader(result.output).tensors}
    for i in range(model.config.num_hidden_layers):
        gate_up = raw[(i, "gate_up_proj")]
        for name, expected in ((f"blk.{i}.ffn_gate_exps.weight", gate_up[:, 0::2]),
                               (f"blk.{i}.ffn_up_exps.weight", gate_up[:, 1::2]),
                               (f"blk.{i}.ffn_down_exps.weight", raw[(i, "down_proj")])):
            assert written[name].tensor_type == gguf.GGMLQuantizationType.MXFP4
            assert result.report.tensors[name]["method"] == "copied"
            assert np.array_equal(np.asarray(written[name].data).reshape(-1), expected.numpy().reshape(-1)), name
        assert result.report.tensors[f"blk.{i}.attn_q.weight"]["method"] == "moequant"
    logits = llama_logits(result.output, eval_tokens(small_tokenizers["qwen2moe"], eval_text, 64))
    assert np.isfinite(logits).all()
