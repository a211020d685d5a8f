"""Float export: llama.cpp's logits of our F32/F16/BF16 GGUF against transformers fp32."""
from __future__ import annotations

import random

import numpy as np
import pytest
from safetensors.torch import save_file

from moeq2gguf import convert, runtime
from testing import random_model, save_checkpoint
from util import FIXTURES, eval_tokens, llama_logits, relative_error, transformers_logits

N_TOKENS = 64

# Random models of shapes other than the bundled ones: GQA ratios, tied embeddings, widths,
# vocabulary larger than the tokenizer (padding rows), no qkv biases.
RANDOM_SHAPES = {
    "mixtral-gqa4-tied": ("mixtral", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                          num_local_experts=4, tie_word_embeddings=True)),
    "mixtral-mqa-3layers": ("mixtral", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                            num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3)),
    "qwen2moe-padded-vocab": ("qwen2moe", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3,
                                               vocab_size=600, num_experts=12, num_experts_per_tok=4)),
    "qwen2moe-no-bias": ("qwen2moe", dict(qkv_bias=False, num_hidden_layers=3)),
    # llama.cpp's qwen2moe graph requires output.weight: a tied checkpoint gets one made from the embeddings
    "qwen2moe-tied": ("qwen2moe", dict(num_hidden_layers=2, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(RANDOM_SHAPES))
def random_checkpoint(request, tmp_path_factory, small_tokenizers):
    family, overrides = RANDOM_SHAPES[request.param]
    model = random_model(family, **overrides)
    path = save_checkpoint(model, small_tokenizers[family], tmp_path_factory.mktemp(request.param))
    return path, model, small_tokenizers[family]


def _check_f32(model_dir, model_or_dir, tokenizer, eval_text, tmp_path):
    out = convert(model_dir, tmp_path / "model-f32.gguf", type="F32", progress=False).output
    tokens = eval_tokens(tokenizer, eval_text, N_TOKENS)
    ref = transformers_logits(model_or_dir, tokens)
    got = llama_logits(out, tokens)
    assert got.shape == ref.shape
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return tokens, ref


def test_random_model_f32_matches_transformers(random_checkpoint, eval_text, tmp_path):
    model_dir, model, tokenizer = random_checkpoint
    _check_f32(model_dir, model, tokenizer, eval_text, tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_fused_expert_layout_converts_identically(family, tmp_path, small_tokenizers, eval_text):
    """Newer transformers keep experts fused ([E, 2*ff, in] gate_up, [E, out, ff] down); a checkpoint
    saved that way converts to the same logits."""
    model = random_model(family)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(fused)
    small_tokenizers[family].save_pretrained(fused)
    _check_f32(fused, model, small_tokenizers[family], eval_text, tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_trained_model_f32_f16_bf16(family, eval_text, tmp_path):
    from transformers import AutoTokenizer
    model_dir = FIXTURES / f"{family}-tiny"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, ref = _check_f32(model_dir, model_dir, tokenizer, eval_text, tmp_path)
    # Half precision: the bundled weights are bf16, so BF16 storage is lossless, but llama.cpp's CPU
    # matmul rounds the activations to the weight type too (BF16: 8 mantissa bits, ~4e-3). Judged per
    # position: 90% of positions within the format's precision; a rare position may move more when
    # the rounding flips a near-tied expert choice (seen: one of 64 at 9e-2 in BF16), argmax kept.
    for type_name, p90_tolerance in (("F16", 1e-3), ("BF16", 5e-3)):
        out = convert(model_dir, tmp_path / f"model-{type_name}.gguf", type=type_name, progress=False).output
        got = llama_logits(out, tokens)
        per_position = np.abs(got - ref).max(-1) / np.abs(ref).max()
        assert np.percentile(per_position, 90) <= p90_tolerance, type_name
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, type_name


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_tokenizer_matches_hugging_face(family, eval_text, tmp_path):
    from transformers import AutoTokenizer
    model_dir = FIXTURES / f"{family}-tiny"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = convert(model_dir, tmp_path / "model.gguf", type="F16", progress=False).output
    lines = [line for line in eval_text.splitlines() if line.strip()]
    sample = random.Random(0).sample(lines, 200)
    with runtime.load(out, n_ctx=64) as llm:
        for line in sample:
            assert runtime.tokenize(llm, line) == tokenizer(line)["input_ids"], line
