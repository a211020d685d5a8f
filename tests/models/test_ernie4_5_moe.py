"""ERNIE-4.5 MoE float export: llama.cpp's logits of our F32 GGUF against transformers fp32."""
from __future__ import annotations

import pytest

from moeq2gguf import Moeq2ggufError, convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # 21B-A3B's layout in small: a leading dense layer, selection-biased softmax routing, 2 shared experts
    "21b-a3b": dict(),
    # tied embeddings (ERNIE's default), no dense layer, no shared expert, MQA, top-3
    "tied-allmoe": dict(tie_word_embeddings=True, moe_layer_start_index=0, moe_num_shared_experts=0,
                        num_key_value_heads=1, num_experts_per_tok=3),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("ernie4_5_moe", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    out = convert(save_checkpoint(model, tok, tmp_path / "ckpt"), tmp_path / "model-f32.gguf", type="F32",
                  progress=False).output
    tokens = eval_tokens(tok, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_interleaved_moe_layers_are_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("ernie4_5_moe", num_hidden_layers=4, moe_layer_interval=2),
                           small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="moe_layer_interval=2"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)
