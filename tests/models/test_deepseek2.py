"""DeepSeek-V2/V3 float export (MLA, grouped and biased routing): llama.cpp against transformers fp32."""
from __future__ import annotations

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq2gguf import Moeq2ggufError, convert
from testing import random_model, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64,
            beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
KIMI_K2 = dict(n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1, moe_intermediate_size=16,
               n_shared_experts=1, routed_scaling_factor=2.827, first_k_dense_replace=1, max_position_embeddings=2048,
               rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=32.0, original_max_position_embeddings=64,
                                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
SHAPES = {
    # V2-Lite layout: q_proj, softmax, no renormalisation, one leading dense layer, 2 shared experts
    "v2-lite": ("deepseek_v2", dict()),
    # V2 with q LoRA, 3 layers, tied embeddings, top-3 and a routed scaling factor
    "v2-qlora-tied": ("deepseek_v2", dict(q_lora_rank=24, num_hidden_layers=3, tie_word_embeddings=True,
                                          num_experts_per_tok=3, routed_scaling_factor=1.5)),
    # V2-Lite's real RoPE: YaRN with mscale_all_dim (context 2560 = 40 x 64)
    "v2-yarn": ("deepseek_v2", dict(rope_parameters=YARN, max_position_embeddings=2560)),
    # V3: sigmoid + selection bias, 4 groups of 2 experts, best 2 groups compete, scaled 2.5
    "v3-grouped": ("deepseek_v3", dict()),
    # V3 with halves RoPE (rope_interleave=false): rotary rows permuted to pairs; no dense layer
    "v3-halves-rope": ("deepseek_v3", dict(rope_interleave=False, first_k_dense_replace=0, n_shared_experts=2)),
    # Kimi-K2's DeepseekV3 config in small: 384 routed experts, 8 active, one group (no group limit), 1 shared,
    # routed scaling 2.827, q LoRA, YaRN with mscale = mscale_all_dim = 1
    "kimi-k2": ("deepseek_v3", KIMI_K2),
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
    family, overrides = SHAPES[shape]
    model = random_model(family, **overrides)
    tok = small_tokenizers["qwen2moe"]
    out = _compare(save_checkpoint(model, tok, tmp_path / "ckpt"), model, tok, eval_text, tmp_path)
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight", "blk.1.attn_kv_a_mqa.weight"} <= names
    assert ("blk.1.exp_probs_b.bias" in names) == (family == "deepseek_v3")


def test_v3_group_routing_and_bias_matter(small_tokenizers, eval_text):
    """The V3 test model's routing depends on the group limit and the selection bias, so the
    comparison above would catch a file that dropped either."""
    tokens = torch.tensor([eval_tokens(small_tokenizers["qwen2moe"], eval_text, 64)])
    ref = random_model("deepseek_v3")
    loose = random_model("deepseek_v3", topk_group=4)
    unbiased = random_model("deepseek_v3")
    with torch.no_grad():
        for name, b in unbiased.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        base = ref(tokens).logits
        assert (loose(tokens).logits - base).abs().max() > 1e-3
        assert (unbiased(tokens).logits - base).abs().max() > 1e-3


def test_v3_multi_token_prediction_layer_is_left_out(tmp_path, small_tokenizers, eval_text):
    """Released V3 checkpoints carry an MTP block as layer num_hidden_layers; llama.cpp's main graph
    never runs it, so the converter leaves it out instead of refusing the checkpoint."""
    model = random_model("deepseek_v3")
    tok = small_tokenizers["qwen2moe"]
    path = save_checkpoint(model, tok, tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    n = model.config.num_hidden_layers
    state[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    state[f"model.layers.{n}.enorm.weight"] = torch.ones(64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    out = _compare(path, model, tok, eval_text, tmp_path)
    assert not any(t.name.startswith(f"blk.{n}.") for t in gguf.GGUFReader(out).tensors)


def test_v2_renormalised_routing_is_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_model("deepseek_v2", norm_topk_prob=True), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="norm_topk_prob=true on DeepSeek-V2"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)


@pytest.mark.parametrize("family, pre", [("deepseek_v2", "deepseek-llm"), ("deepseek_v3", "deepseek-v3")])
def test_pre_tokenizer_name_and_token_ids(family, pre, tmp_path, eval_text):
    """A byte-level BPE splitting with the family's regexes gets llama.cpp's pre-tokenizer name and
    the same token ids as Hugging Face on 200 eval lines."""
    import random

    from moeq2gguf import runtime
    from testing import train_split_bpe_tokenizer
    tok = train_split_bpe_tokenizer([eval_text[:200_000]], 512, pre)
    out = convert(save_checkpoint(random_model(family), tok, tmp_path / "c"), tmp_path / "m.gguf", type="F16",
                  progress=False).output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    lines = random.Random(0).sample([line for line in eval_text.splitlines() if line.strip()], 200)
    with runtime.load(out, n_ctx=64) as llm:
        for line in lines:
            assert runtime.tokenize(llm, line) == tok(line)["input_ids"], line


def test_v2_group_limited_greedy_warns(tmp_path, small_tokenizers, caplog):
    """V2's group rule (best expert per group) is not llama.cpp's (best two): converted with a warning."""
    from moeq2gguf.models.registry import open_model
    model = random_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    path = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "c")
    with caplog.at_level("WARNING"):
        spec = open_model(path).spec
    assert (spec.routing.n_groups, spec.routing.n_groups_used) == (4, 2)
    assert "ranks expert groups by their best expert" in caplog.text
