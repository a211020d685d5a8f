"""Llama-4 text float export: llama.cpp's logits of our F32 GGUF against transformers fp32, for the text class and
the multimodal class the hub checkpoints use."""
from __future__ import annotations

import gguf
import pytest
import torch

from moeq2gguf import Moeq2ggufError, convert
from testing import make_config, random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # dense/MoE alternating (Maverick's step 2), llama3 RoPE scaling (rope_freqs), NoPE layer 3, q/k L2 norm
    "step2-llama3": dict(),
    # Scout's step 1 (every layer MoE), default RoPE, top-2, tied embeddings
    "scout-tied": dict(interleave_moe_layer_step=1, num_experts_per_tok=2, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Maverick's 128 experts: llama.cpp turns the q/k norm off for them, as the checkpoint does
    "128-experts": dict(num_local_experts=128, use_qk_norm=False, num_hidden_layers=4),
}


def _compare(model, checkpoint, tokenizer, eval_text, tmp_path):
    out = convert(checkpoint, tmp_path / "model-f32.gguf", type="F32", progress=False).output
    tokens = eval_tokens(tokenizer, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("llama4", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    out = _compare(model, save_checkpoint(model, tok, tmp_path / "ckpt"), tok, eval_text, tmp_path)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("rope_freqs.weight" in names) == (shape != "scout-tied")   # llama3 scaling: its factors


def test_hub_multimodal_layout(tmp_path, small_tokenizers, eval_text):
    """Llama4ForConditionalGeneration: text weights under language_model., a vision tower left out."""
    import transformers
    text = make_config("llama4")
    vision = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vision_output_dim=32, projector_input_dim=32,
                                             projector_output_dim=text.hidden_size, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and name.startswith("language_model"):
                p.uniform_(0.5, 1.5)
            elif name.startswith("language_model") and p.dim() >= 2:
                p.normal_(0, 0.1)
    tok = small_tokenizers["qwen2moe"]
    _compare(model, save_checkpoint(model, tok, tmp_path / "ckpt"), tok, eval_text, tmp_path)


@pytest.mark.parametrize("override, message", [
    (dict(no_rope_layers=[1, 1, 0, 1]), "every 4th layer"),
    (dict(attention_chunk_size=4096), "attention_chunk_size=4096"),
    (dict(use_qk_norm=False), "use_qk_norm=False"),
])
def test_what_llama_cpp_hard_codes_is_checked(override, message, tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("llama4", **override), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match=message):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)
