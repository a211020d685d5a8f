"""OLMoE float export: llama.cpp's logits of our F32 GGUF against transformers fp32."""
from __future__ import annotations

import gguf
import pytest

from moeq2gguf import Moeq2ggufError, convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

SHAPES = {
    "default": dict(),
    # llama.cpp's olmoe graph requires `output`: a tied checkpoint gets a copy of the embeddings
    "tied-3layers": dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=6,
                         tie_word_embeddings=True, num_experts=4, num_experts_per_tok=1),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_f32_matches_transformers(shape, tmp_path, small_tokenizers, eval_text):
    model = random_model("olmoe", **SHAPES[shape])
    tok = small_tokenizers["qwen2moe"]
    out = convert(save_checkpoint(model, tok, tmp_path / "ckpt"), tmp_path / "m.gguf", type="F32", progress=False).output
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"output.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    tokens = eval_tokens(tok, eval_text, 64)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_grouped_kv_heads_are_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("olmoe", num_key_value_heads=2), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="key/value heads = heads"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)


def test_unrecognised_split_falls_back_to_olmo(tmp_path, small_tokenizers):
    """A pre-tokenizer we cannot name gets the family's llama.cpp name, which llama.cpp accepts."""
    import json

    from moeq2gguf import runtime
    path = save_checkpoint(random_model("olmoe"), small_tokenizers["qwen2moe"], tmp_path / "c")
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (path / "tokenizer.json").write_text(json.dumps(tj))
    out = convert(path, tmp_path / "m.gguf", type="F16", progress=False).output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "olmo"
    with runtime.load(out, n_ctx=64) as llm:
        assert runtime.tokenize(llm, "def f(x):")
