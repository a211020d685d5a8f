"""OLMoE (OlmoeForCausalLM) -> llama.cpp arch `olmoe`.

Llama-shaped attention with an RMSNorm over the whole q and k projections (`self_attn.{q,k}_norm`,
width n_embd, before the head split and RoPE). llama.cpp loads k_norm with width n_embd, so it
needs key/value heads = heads, as the released model has. Experts are `mlp.experts.E.*` with the
expert width in feed_forward_length; routing: softmax, top-k, not renormalised (llama.cpp's olmoe
graph hard-codes that). llama.cpp requires an `output` tensor: a tied checkpoint gets a copy of the
embeddings. RoPE is NeoX-style on both sides: no permutation. clip_qkv is not run by llama.cpp.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register


@register
class OlmoeAdapter(FamilyAdapter):
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMOE
    family = "olmoe"
    default_pre_tokenizer = "olmo"
    requires_output = True

    def make_spec(self, config: dict) -> ModelSpec:
        n_heads = config_value(config, "num_attention_heads")
        n_kv_heads = config_value(config, "num_key_value_heads", default=n_heads)
        if n_kv_heads != n_heads:
            raise Moeq2ggufError(
                f"num_key_value_heads={n_kv_heads} with {n_heads} heads: llama.cpp's olmoe graph normalises k over "
                "n_embd and so needs key/value heads = heads, as the released OLMoE has")
        if config.get("norm_topk_prob"):
            raise Moeq2ggufError("norm_topk_prob=true: llama.cpp's olmoe graph never renormalises the top-k weights")
        if config.get("clip_qkv") is not None:
            raise Moeq2ggufError(f"clip_qkv={config['clip_qkv']}: llama.cpp's olmoe graph does not clip q/k/v; "
                                 "only checkpoints with clip_qkv null convert")
        if config.get("attention_bias"):
            raise Moeq2ggufError("attention_bias=true: llama.cpp's olmoe graph has no attention output bias")
        n_layers = config_value(config, "num_hidden_layers")
        hidden = config_value(config, "hidden_size")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=hidden // n_heads,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=rope_theta_of(config, 10000.0),
            n_experts=config_value(config, "num_experts", "num_local_experts"), n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "intermediate_size"),
            routing=Routing(scoring="softmax", renormalize=False),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)), qk_norm="full",
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(self.spec.expert_width)  # olmoe reads the expert width here

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        return [*self.llama_attention(bid, qk_norm=True), *self.hf_routed_experts(bid)]

