"""GPT-OSS float export (sinks, biases, sliding window, interleaved gate/up, clamped SwiGLU) and its
MXFP4 expert layout: llama.cpp's logits against transformers fp32."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.models.gpt_oss import mxfp4_dequantize, mxfp4_to_ggml
from moeq2gguf.models.registry import open_model
from testing import random_model, save_checkpoint, save_mxfp4_gpt_oss
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # window 16 < 64 tokens: the sliding layers really slide
    "window16": dict(),
    "3layers-mqa-window8-tied": dict(num_hidden_layers=3, num_key_value_heads=1, sliding_window=8,
                                     num_local_experts=6, num_experts_per_tok=3, hidden_size=96, head_dim=24,
                                     tie_word_embeddings=True),
    # YaRN with truncate=true (llama.cpp always rounds the correction range)
    "yarn": dict(rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                      beta_slow=1.0, original_max_position_embeddings=64, truncate=True),
                 max_position_embeddings=2048),
}


def _compare(model_dir, model, tokenizer, eval_text, tmp_path):
    out = convert(model_dir, tmp_path / "model-f32.gguf", type="F32", progress=False).output
    tokens = eval_tokens(tokenizer, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("gpt_oss", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    _compare(save_checkpoint(model, tok, tmp_path / "ckpt"), model, tok, eval_text, tmp_path)


def _random_mxfp4(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """HF MXFP4 blocks [..., G, 16] and scales [..., G] (exponents 2^-5 .. 2^-3)."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(122, 125, shape, dtype=torch.uint8, generator=gen)
    return blocks, scales


def test_mxfp4_packing_matches_ggml_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    blocks, scales = _random_mxfp4((3, 5, 4), torch.Generator().manual_seed(0))
    blocks[0, 0, 0, 0], scales[0, 0, 0] = 0x8F, 1      # -0 and -6 at the bottom of the E8M0 range
    ours = mxfp4_dequantize(blocks, scales)                                       # [3, 5, 128]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(ours, theirs)
    packed = mxfp4_to_ggml(blocks, scales).numpy()                                # [3, 5, 4*17]
    ggml = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(ggml, ours.numpy())


def test_mxfp4_checkpoint(tmp_path, small_tokenizers, eval_text):
    """Released GPT-OSS ships its experts as MXFP4 blocks/scales: the converter reads them (float
    export is exact) and offers the GGML MXFP4 blocks for a writer that keeps the format."""
    model = random_model("gpt_oss")
    tok = small_tokenizers["qwen2moe"]
    path = tmp_path / "mxfp4"
    save_mxfp4_gpt_oss(model, tok, path)

    adapter = open_model(path)
    experts = [s for s in adapter.all_tensors() if s.name.endswith("_exps.weight")]
    assert len(experts) == 3 * model.config.num_hidden_layers
    for source in experts:
        assert source.raw_qtype == gguf.GGMLQuantizationType.MXFP4
        raw = source.load_raw().numpy()
        assert raw.shape == (*source.shape[:-1], source.shape[-1] // 32 * 17)
        assert np.array_equal(gguf.quants.dequantize(raw, source.raw_qtype), source.load().numpy())
    gate = next(s for s in experts if s.name == "blk.0.ffn_gate_exps.weight").load()
    assert torch.equal(gate, model.model.layers[0].mlp.experts.gate_up_proj[..., 0::2].transpose(1, 2))

    # the export keeps the experts' MXFP4 blocks byte for byte (as llama.cpp's converter does)
    out = convert(path, tmp_path / "mxfp4.gguf", type="F32", progress=False).output
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for source in experts:
        t = written[source.name]
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        assert np.array_equal(np.asarray(t.data).reshape(-1), source.load_raw().numpy().reshape(-1))
    # llama.cpp multiplies MXFP4 weights with 8-bit quantized activations: close, not exact
    tokens = eval_tokens(tok, eval_text, 64)
    ref = transformers_logits(model, tokens)
    got = llama_logits(out, tokens)
    assert relative_error(got, ref) < 5e-2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_other_swiglu_constants_are_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("gpt_oss", swiglu_limit=5.0), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="swiglu_limit=5.0"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)


def test_o200k_pre_tokenizer_name_and_token_ids(tmp_path, eval_text):
    import random

    from moeq2gguf import runtime
    from testing import train_split_bpe_tokenizer
    tok = train_split_bpe_tokenizer([eval_text[:200_000]], 512, "gpt-4o")
    out = convert(save_checkpoint(random_model("gpt_oss"), tok, tmp_path / "c"), tmp_path / "m.gguf", type="F16",
                  progress=False).output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "gpt-4o"
    lines = random.Random(0).sample([line for line in eval_text.splitlines() if line.strip()], 200)
    with runtime.load(out, n_ctx=64) as llm:
        for line in lines:
            assert runtime.tokenize(llm, line) == tok(line)["input_ids"], line
