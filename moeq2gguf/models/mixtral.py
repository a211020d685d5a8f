"""Mixtral (MixtralForCausalLM) -> llama.cpp arch `llama` with routed experts.

On disk: `model.layers.N.block_sparse_moe.{gate, experts.E.w1|w2|w3}` (w1 = gate, w3 = up,
w2 = down); newer transformers keep `mlp.{gate, experts.gate_up_proj, experts.down_proj}` in memory
and some tools save that. Routing: softmax, top-k, renormalised (hard-coded in llama.cpp's llama graph).
llama.cpp's `llama` graph applies RoPE to adjacent pairs, Hugging Face to the two halves of each
head: q and k rows are permuted so both compute the same thing.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class MixtralAdapter(FamilyAdapter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    family = "mixtral"
    default_pre_tokenizer = "llama-bpe"

    def make_spec(self, config: dict) -> ModelSpec:
        if config.get("sliding_window") not in (None, 0) and config["sliding_window"] < config.get("max_position_embeddings", 0):
            raise Moeq2ggufError(
                f"sliding_window={config['sliding_window']} is not supported by llama.cpp's llama graph; set it to null in config.json")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden,
            n_layers=config_value(config, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=config_value(config, "head_dim", default=hidden // n_heads),
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=rope_theta_of(config, 1e6),
            n_experts=config_value(config, "num_local_experts"), n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "intermediate_size"),
            routing=Routing(scoring="softmax", renormalize=True),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(config_value(config, "num_hidden_layers"))),
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(self.spec.expert_width)  # llama reads the expert width here

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        moe = "block_sparse_moe" if self.reader.has(p + "block_sparse_moe.gate.weight") else "mlp"
        return [
            *self.llama_attention(bid, permute_qk=True),
            self.tensor(p + f"{moe}.gate.weight", T.FFN_GATE_INP, "router", bid),
            *self.stacked_experts(
                bid,
                {T.FFN_GATE_EXP: p + "block_sparse_moe.experts.{e}.w1.weight",
                 T.FFN_DOWN_EXP: p + "block_sparse_moe.experts.{e}.w2.weight",
                 T.FFN_UP_EXP: p + "block_sparse_moe.experts.{e}.w3.weight"},
                fused_gate_up=p + "mlp.experts.gate_up_proj", fused_down=p + "mlp.experts.down_proj"),
        ]
