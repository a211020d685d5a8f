"""GLM-4.5 MoE float export: llama.cpp's logits of our F32 GGUF against transformers fp32."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq2gguf import convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # GLM-4.5-Air's shape: layer 0 dense, q/k/v biases, half of each head rotated, one shared expert
    "air": dict(),
    # GLM-4.5 355B's options: q/k norm per head; here also expert groups (4 of 2, best 2 compete), no dense
    # layer, two shared experts, a quarter of each head rotated, tied embeddings
    "qknorm-groups": dict(num_hidden_layers=3, use_qk_norm=True, n_group=4, topk_group=2, first_k_dense_replace=0,
                          n_shared_experts=2, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.25}),
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
    model = random_model("glm4moe", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    _compare(save_checkpoint(model, tok, tmp_path / "ckpt"), model, tok, eval_text, tmp_path)


def test_multi_token_prediction_layer_is_left_out(tmp_path, small_tokenizers, eval_text):
    """Hub GLM-4.5 checkpoints carry their MTP block as layer num_hidden_layers: it is not part of the
    main graph, so the file leaves it out (and still equals transformers, which never runs it either)."""
    import gguf
    model = random_model("glm4moe")
    tok = small_tokenizers["qwen2moe"]
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    n = model.config.num_hidden_layers
    tensors.update({f"model.layers.{n}.eh_proj.weight": torch.randn(64, 128),
                    f"model.layers.{n}.enorm.weight": torch.ones(64),
                    f"model.layers.{n}.input_layernorm.weight": torch.ones(64)})
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = _compare(ckpt, model, tok, eval_text, tmp_path)
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert not any(name.startswith(f"blk.{n}.") for name in names)
    assert "blk.1.post_attention_norm.weight" in names and "blk.1.exp_probs_b.bias" in names
