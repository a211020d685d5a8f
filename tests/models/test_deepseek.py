"""DeepSeekMoE-16B layout (DeepseekForCausalLM): transformers has no class for it, so llama.cpp is
compared with testing's reference forward, itself checked here against transformers'
Llama (dense layers) and Qwen2-MoE (routed + shared experts) on the same weights."""
from __future__ import annotations

import gguf
import pytest
import torch
import transformers

from moeq2gguf import Moeq2ggufError, convert
from testing import deepseek_moe_config, random_deepseek_moe, save_checkpoint
from util import eval_tokens, llama_logits, relative_error, transformers_logits


@pytest.fixture(scope="module")
def tokens(small_tokenizers, eval_text):
    return eval_tokens(small_tokenizers["qwen2moe"], eval_text, 64)


def _common(c: dict) -> dict:
    return dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]}, tie_word_embeddings=False)


def test_reference_dense_layers_equal_llama(tokens):
    ref = random_deepseek_moe(first_k_dense_replace=3, num_key_value_heads=2)
    c = ref.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=c["intermediate_size"], **_common(c)))
    llama.load_state_dict(ref.state_dict(), strict=True)  # same tensor names as DeepSeekMoE's dense layers
    ids = torch.tensor([tokens])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, llama.eval()(ids).logits, rtol=0, atol=1e-5)


def test_reference_moe_layers_equal_qwen2moe(tokens):
    """Qwen2-MoE without qkv biases is DeepSeekMoE's MoE layer once its shared-expert gate is fixed
    at sigmoid(0) = 1/2 and its shared down projection doubled."""
    ref = random_deepseek_moe(first_k_dense_replace=0)
    c = ref.config
    qwen = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=c["intermediate_size"], moe_intermediate_size=c["moe_intermediate_size"],
        shared_expert_intermediate_size=c["moe_intermediate_size"] * c["n_shared_experts"],
        num_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"], norm_topk_prob=False,
        qkv_bias=False, **_common(c))).eval()
    with torch.no_grad():
        for i, layer in enumerate(qwen.model.layers):
            src = ref.model.layers[i]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
            layer.input_layernorm.weight.copy_(src.input_layernorm.weight)
            layer.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            layer.mlp.gate.weight.copy_(src.mlp.gate.weight)
            experts = src.mlp.experts
            layer.mlp.experts.gate_up_proj.copy_(torch.stack(
                [torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in experts]))
            layer.mlp.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in experts]))
            layer.mlp.shared_expert_gate.weight.zero_()
            layer.mlp.shared_expert.gate_proj.weight.copy_(src.mlp.shared_experts.gate_proj.weight)
            layer.mlp.shared_expert.up_proj.weight.copy_(src.mlp.shared_experts.up_proj.weight)
            layer.mlp.shared_expert.down_proj.weight.copy_(2 * src.mlp.shared_experts.down_proj.weight)
        qwen.model.embed_tokens.weight.copy_(ref.model.embed_tokens.weight)
        qwen.model.norm.weight.copy_(ref.model.norm.weight)
        qwen.lm_head.weight.copy_(ref.lm_head.weight)
        ids = torch.tensor([tokens])
        assert torch.allclose(ref(ids).logits, qwen(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=2, first_k_dense_replace=0,
                                                     n_shared_experts=1, num_experts_per_tok=3)],
                         ids=["dense1-shared2", "gqa-allmoe-shared1"])
def test_f32_matches_reference(overrides, tokens, tmp_path, small_tokenizers):
    model = random_deepseek_moe(**overrides)
    path = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "ckpt")
    out = convert(path, tmp_path / "m.gguf", type="F32", progress=False).output
    assert gguf.GGUFReader(out).fields["deepseek.leading_dense_block_count"].contents() == \
        model.config["first_k_dense_replace"]
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_config_keys_are_the_hub_checkpoints():
    keys = set(deepseek_moe_config())
    assert {"n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_intermediate_size",
            "num_experts_per_tok", "norm_topk_prob", "scoring_func", "moe_layer_freq"} <= keys


def test_renormalised_routing_is_refused(tmp_path, small_tokenizers):
    path = save_checkpoint(random_deepseek_moe(norm_topk_prob=True), small_tokenizers["qwen2moe"], tmp_path / "c")
    with pytest.raises(Moeq2ggufError, match="norm_topk_prob=true"):
        convert(path, tmp_path / "m.gguf", type="F32", progress=False)
