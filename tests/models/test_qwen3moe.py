"""Qwen3-MoE float export: llama.cpp's logits of our F32 GGUF against transformers fp32."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from moeq2gguf import Moeq2ggufError, convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # head_dim 32 with hidden 64 / 4 heads: head_dim is its own key, not hidden / heads
    "gqa-wide-heads": dict(),
    "tied-3layers": dict(num_hidden_layers=3, head_dim=16, num_key_value_heads=4, tie_word_embeddings=True,
                         num_experts=6, num_experts_per_tok=3),
}


def _compare(model_dir, model, tokenizer, eval_text, tmp_path):
    out = convert(model_dir, tmp_path / "model-f32.gguf", type="F32", progress=False).output
    tokens = eval_tokens(tokenizer, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("qwen3moe", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    _compare(save_checkpoint(model, tok, tmp_path / "ckpt"), model, tok, eval_text, tmp_path)


def test_fused_expert_layout(tmp_path, small_tokenizers, eval_text):
    model = random_model("qwen3moe")
    tok = small_tokenizers["qwen2moe"]
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(fused)
    tok.save_pretrained(fused)
    _compare(fused, model, tok, eval_text, tmp_path)


def test_unnormalised_routing_is_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("qwen3moe", norm_topk_prob=False), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="norm_topk_prob=false"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)


def test_qwen2_pre_tokenizer_name_and_token_ids(tmp_path, eval_text):
    import random

    import gguf

    from moeq2gguf import runtime
    from testing import train_split_bpe_tokenizer
    tok = train_split_bpe_tokenizer([eval_text[:200_000]], 512, "qwen2")
    out = convert(save_checkpoint(random_model("qwen3moe"), tok, tmp_path / "c"), tmp_path / "m.gguf", type="F16",
                  progress=False).output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    lines = random.Random(0).sample([line for line in eval_text.splitlines() if line.strip()], 200)
    with runtime.load(out, n_ctx=64) as llm:
        for line in lines:
            assert runtime.tokenize(llm, line) == tok(line)["input_ids"], line
