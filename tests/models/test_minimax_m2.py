"""MiniMax-M2 float export: llama.cpp's logits of our F32 GGUF against transformers fp32."""
from __future__ import annotations

import pytest

from moeq2gguf import Moeq2ggufError, convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    # the released shape in small: head_dim its own key, half of each head rotated (rotary_dim), q/k norm over
    # the whole projection, sigmoid routing with a selection bias
    "m2": dict(),
    # tied embeddings (llama.cpp's graph needs `output`: a copy is written), MQA, top-3, a quarter rotated
    "tied-mqa": dict(num_hidden_layers=3, num_key_value_heads=1, num_experts_per_tok=3, rotary_dim=8,
                     tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("minimax_m2", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    out = convert(save_checkpoint(model, tok, tmp_path / "ckpt"), tmp_path / "model-f32.gguf", type="F32",
                  progress=False).output
    tokens = eval_tokens(tok, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_softmax_scoring_is_refused(tmp_path, small_tokenizers):
    import json
    path = save_checkpoint(random_model("minimax_m2"), small_tokenizers["qwen2moe"], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.raises(Moeq2ggufError, match="scoring_func='softmax'"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)
