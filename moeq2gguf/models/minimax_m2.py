"""MiniMax-M2 / M2.1 (MiniMaxM2ForCausalLM) -> llama.cpp arch `minimax-m2`.

Attention: GQA without biases, an RMSNorm over the whole q and k projections (`self_attn.{q,k}_norm`,
widths n_head*head_dim and n_kv_head*head_dim, before the head split, as OLMoE), and partial RoPE:
the first rotary_dim (64 of 128 in the released model; `rotary_dim`, or head_dim *
partial_rotary_factor) dimensions of each head rotate, NeoX-style, on both sides: no permutation.

FFN: every layer is MoE, no shared expert. Router `block_sparse_moe.gate`, selection bias
`block_sparse_moe.e_score_correction_bias` (exp_probs_b), experts `block_sparse_moe.experts.E.w1/w3/w2`
(gate/up/down, Mixtral's names). Routing: sigmoid, the bias only in the choice, top-k, always
renormalised (llama.cpp's graph hard-codes it, as transformers does), no scaling.
llama.cpp's graph requires an `output` tensor: a tied checkpoint gets a copy of the embeddings.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.glm4moe import partial_rotary_factor
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class MiniMaxM2Adapter(FamilyAdapter):
    hf_architectures = ("MiniMaxM2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.MINIMAXM2
    family = "minimax-m2"
    default_pre_tokenizer = "minimax-m2"
    requires_output = True

    def make_spec(self, config: dict) -> ModelSpec:
        scoring = config.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise Moeq2ggufError(f"scoring_func={scoring!r}: MiniMax-M2 routes by sigmoid; transformers and llama.cpp "
                                 "run nothing else for this architecture")
        if config.get("use_routing_bias") is False:
            raise Moeq2ggufError("use_routing_bias=false: llama.cpp's minimax-m2 graph requires the selection bias "
                                 "(e_score_correction_bias), and transformers always adds it")
        n_layers = config_value(config, "num_hidden_layers")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        head_dim = config_value(config, "head_dim", default=hidden // n_heads)
        rope_dim = int(config.get("rotary_dim") or head_dim * partial_rotary_factor(config, 1.0))
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise Moeq2ggufError(f"rotary_dim {rope_dim} must be even and between 2 and head_dim ({head_dim})")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads), head_dim=head_dim,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps", default=1e-6), rope_theta=rope_theta_of(config, 10000.0),
            n_experts=config_value(config, "num_local_experts", "num_experts"),
            n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "intermediate_size"),
            routing=Routing(scoring="sigmoid", renormalize=True, selection_bias=True),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)), qk_norm="full", rope_dim=rope_dim,
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(self.spec.expert_width)   # the graph sizes the experts by n_ff
        writer.add_expert_feed_forward_length(self.spec.expert_width)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        if self.spec.head_dim * self.spec.n_heads == self.spec.hidden_size:   # llama.cpp's converter always writes them
            writer.add_key_length(self.spec.head_dim)
            writer.add_value_length(self.spec.head_dim)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}.block_sparse_moe."
        return [
            *self.llama_attention(bid, qk_norm=True),
            self.tensor(p + "gate.weight", T.FFN_GATE_INP, "router", bid),
            self.tensor(p + "e_score_correction_bias", T.FFN_EXP_PROBS_B, "router", bid, suffix="bias"),
            *self.stacked_experts(
                bid,
                {T.FFN_GATE_EXP: p + "experts.{e}.w1.weight", T.FFN_UP_EXP: p + "experts.{e}.w3.weight",
                 T.FFN_DOWN_EXP: p + "experts.{e}.w2.weight"},
                fused_gate_up=p + "experts.gate_up_proj", fused_down=p + "experts.down_proj"),
        ]
