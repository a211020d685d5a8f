"""Qwen3-MoE (Qwen3MoeForCausalLM) -> llama.cpp arch `qwen3moe`.

Like Qwen2-MoE without the shared expert and without q/k/v biases, plus an RMSNorm over each head
of q and of k (`self_attn.{q,k}_norm`, width head_dim) before RoPE. head_dim is its own config key
(128 in the released models, not hidden/heads). Routing: softmax, top-k, renormalised: llama.cpp's
qwen3moe graph hard-codes the renormalisation, so norm_topk_prob=false checkpoints are refused.
RoPE is NeoX-style on both sides: no permutation.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class Qwen3MoeAdapter(FamilyAdapter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    family = "qwen3moe"
    default_pre_tokenizer = "qwen2"

    def make_spec(self, config: dict) -> ModelSpec:
        if not config.get("norm_topk_prob", False):
            raise Moeq2ggufError("norm_topk_prob=false: llama.cpp's qwen3moe graph always renormalises the top-k "
                                 "weights, so the file would run wrong; only renormalised Qwen3-MoE checkpoints convert")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise Moeq2ggufError("dense layers between MoE layers (mlp_only_layers / decoder_sparse_step != 1) are not "
                                 "supported by llama.cpp's qwen3moe graph")
        if config.get("use_sliding_window"):
            raise Moeq2ggufError("use_sliding_window=true is not supported by llama.cpp's qwen3moe graph; set it to false")
        if config.get("attention_bias"):
            raise Moeq2ggufError("attention_bias=true: llama.cpp's qwen3moe graph has no attention output bias")
        n_layers = config_value(config, "num_hidden_layers")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=config_value(config, "head_dim", default=hidden // n_heads),
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=rope_theta_of(config, 1e6),
            n_experts=config_value(config, "num_experts", "num_local_experts"), n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "moe_intermediate_size"),
            routing=Routing(scoring="softmax", renormalize=True),
            dense_width=config_value(config, "intermediate_size", required=False, default=0),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)), qk_norm="head",
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        self.add_common_metadata(writer)
        if self.spec.dense_width:
            writer.add_feed_forward_length(self.spec.dense_width)
        writer.add_expert_feed_forward_length(self.spec.expert_width)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        return [*self.llama_attention(bid, qk_norm=True), *self.hf_routed_experts(bid)]
