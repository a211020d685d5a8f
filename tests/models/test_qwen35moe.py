"""Qwen3.5 / 3.6 MoE float export (Gated DeltaNet + gated full attention): llama.cpp's logits of our F32 GGUF
against transformers fp32, for the text class and for the multimodal class the hub checkpoints use."""
from __future__ import annotations

import gguf
import pytest
import torch

from moeq2gguf import Moeq2ggufError, convert
from testing import make_config, random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # Qwen3.5-35B-A3B's layout in small: 3 linear-attention layers then 1 full, 2 key heads over 4 value heads
    "35b-a3b": dict(),
    # equal key and value heads, full attention every 2nd layer, MQA, tied embeddings, 3 of 6 experts
    "equal-heads-tied": dict(num_hidden_layers=4, linear_num_value_heads=2, num_key_value_heads=1,
                             layer_types=["linear_attention", "full_attention"] * 2, tie_word_embeddings=True,
                             num_experts=6, num_experts_per_tok=3),
}


def _compare(model, checkpoint, tokenizer, eval_text, tmp_path, n_tokens: int = 96):
    out = convert(checkpoint, tmp_path / "model-f32.gguf", type="F32", progress=False).output
    tokens = eval_tokens(tokenizer, eval_text, n_tokens)   # more than one 64-token chunk of the recurrence
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("qwen35moe", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    out = _compare(model, save_checkpoint(model, tok, tmp_path / "ckpt"), tok, eval_text, tmp_path)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ssm_a", "blk.0.ssm_conv1d.weight", "blk.0.ffn_gate_inp_shexp.weight"} <= names
    assert "blk.3.attn_q.weight" in names and "blk.3.ssm_a" not in names


def test_hub_multimodal_layout(tmp_path, small_tokenizers, eval_text):
    """The hub's Qwen3_5MoeForConditionalGeneration: text weights under model.language_model., a vision tower
    that the text GGUF leaves out (llama.cpp keeps it in a separate mmproj file)."""
    import transformers
    text = make_config("qwen35moe")
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=text.hidden_size,
                  num_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision)).eval()
    with torch.no_grad():   # as random_model does: norms away from their init, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "visual" not in name:
                p.uniform_(-0.5, 0.5)
    tok = small_tokenizers["qwen2moe"]
    _compare(model, save_checkpoint(model, tok, tmp_path / "ckpt"), tok, eval_text, tmp_path)


def test_unequal_linear_head_sizes_are_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("qwen35moe", linear_value_head_dim=32), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="llama.cpp needs equal head sizes"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)
