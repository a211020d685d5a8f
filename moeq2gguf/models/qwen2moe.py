"""Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM) -> llama.cpp arch `qwen2moe`.

Fine-grained routed experts (`mlp.experts.E.{gate,up,down}_proj`), softmax top-k without
renormalisation, plus one shared expert whose output is multiplied by sigmoid(shared_expert_gate . x).
q/k/v carry biases. RoPE is NeoX-style on both sides, so no permutation.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class Qwen2MoeAdapter(FamilyAdapter):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    family = "qwen2moe"
    default_pre_tokenizer = "qwen2"
    requires_output = True

    def make_spec(self, config: dict) -> ModelSpec:
        n_layers = config_value(config, "num_hidden_layers")
        if config.get("norm_topk_prob"):
            raise Moeq2ggufError("norm_topk_prob=true: llama.cpp's qwen2moe graph never renormalises the top-k weights, "
                                 "so the file would run wrong; use a Qwen3-MoE export for renormalised routing")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise Moeq2ggufError("dense layers between MoE layers (mlp_only_layers / decoder_sparse_step != 1) are not "
                                 "supported by llama.cpp's qwen2moe graph")
        if config.get("use_sliding_window"):
            raise Moeq2ggufError("use_sliding_window=true is not supported by llama.cpp's qwen2moe graph; set it to false")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=hidden // n_heads,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=rope_theta_of(config, 1e6),
            n_experts=config_value(config, "num_experts"), n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "moe_intermediate_size"),
            routing=Routing(scoring="softmax", renormalize=False),
            shared_expert_width=config_value(config, "shared_expert_intermediate_size"), shared_expert_gated=True,
            dense_width=config_value(config, "intermediate_size"),
            attention_bias=bool(config.get("qkv_bias", True)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)),
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(self.spec.dense_width)
        writer.add_expert_feed_forward_length(self.spec.expert_width)
        writer.add_expert_shared_feed_forward_length(self.spec.shared_expert_width)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        return [
            *self.llama_attention(bid, biases=self.spec.attention_bias),
            *self.hf_routed_experts(bid),
            self.tensor(p + "mlp.shared_expert_gate.weight", T.FFN_GATE_INP_SHEXP, "router", bid),
            self.tensor(p + "mlp.shared_expert.gate_proj.weight", T.FFN_GATE_SHEXP, "shared", bid),
            self.tensor(p + "mlp.shared_expert.up_proj.weight", T.FFN_UP_SHEXP, "shared", bid),
            self.tensor(p + "mlp.shared_expert.down_proj.weight", T.FFN_DOWN_SHEXP, "shared", bid),
        ]
