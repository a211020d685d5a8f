"""ERNIE-4.5 MoE (Ernie4_5_MoeForCausalLM: ERNIE-4.5-21B-A3B, -300B-A47B) -> llama.cpp arch `ernie4_5-moe`.

Llama-shaped attention without biases; RoPE on adjacent pairs, as the weights are laid out (llama.cpp's NORM
rotation): no permutation. The first moe_layer_start_index layers are dense (`mlp.{gate,up,down}_proj`), the rest
MoE: router `mlp.gate`, a selection bias `mlp.moe_statics.e_score_correction_bias` [1, E] (exp_probs_b: it biases
the choice only), experts `mlp.experts.E.*`, moe_num_shared_experts shared experts fused in `mlp.shared_experts`
(width moe_intermediate_size x that count), added unweighted. Routing: softmax, top-k over the biased scores,
the unbiased probabilities renormalised (llama.cpp hard-codes both).
llama.cpp's loader makes every layer from moe_layer_start_index on a MoE layer, so an interval other than 1 or
an end index before the last layer is refused. The multi-token-prediction tensors (`mtp_*`) are left out.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class Ernie45MoeAdapter(FamilyAdapter):
    hf_architectures = ("Ernie4_5_MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.ERNIE4_5_MOE
    family = "ernie4_5-moe"
    default_pre_tokenizer = "default"

    def make_spec(self, config: dict) -> ModelSpec:
        n_layers = config_value(config, "num_hidden_layers")
        if config.get("use_bias"):
            raise Moeq2ggufError("use_bias=true: llama.cpp's ernie4_5-moe graph has no q/k/v or FFN biases")
        if int(config.get("moe_layer_interval") or 1) != 1:
            raise Moeq2ggufError(f"moe_layer_interval={config['moe_layer_interval']}: llama.cpp's ernie4_5-moe loader makes "
                                 "every layer after the leading dense ones a MoE layer; only interval 1 converts")
        end = config.get("moe_layer_end_index")
        if end is not None and 0 <= int(end) < n_layers - 1:
            raise Moeq2ggufError(f"moe_layer_end_index={end} leaves dense layers at the end, which llama.cpp's ernie4_5-moe "
                                 "graph does not have")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        n_dense = int(config.get("moe_layer_start_index") or 0)
        n_shared = int(config.get("moe_num_shared_experts") or 0)
        expert_width = config_value(config, "moe_intermediate_size")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=config_value(config, "head_dim", default=hidden // n_heads),
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps", default=1e-5), rope_theta=rope_theta_of(config, 500000.0),
            n_experts=config_value(config, "moe_num_experts", "num_experts"),
            n_experts_used=config_value(config, "moe_k", "num_experts_per_tok"), expert_width=expert_width,
            routing=Routing(scoring="softmax", renormalize=True, selection_bias=True),
            n_shared_experts=n_shared, shared_expert_width=expert_width * n_shared,
            dense_width=config_value(config, "intermediate_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_dense, n_layers)),
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(s.dense_width)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_interleave_moe_layer_step(1)
        writer.add_leading_dense_block_count(len(s.dense_layers))
        writer.add_expert_shared_count(s.n_shared_experts)
        if s.n_shared_experts:
            writer.add_expert_shared_feed_forward_length(s.shared_expert_width)

    def ignored(self, name: str) -> bool:
        return name.startswith(("model.mtp_", "mtp_"))

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        out = self.llama_attention(bid)
        if bid not in self.spec.moe_layers:
            return out + self.dense_ffn(bid, p + "mlp")
        bias = self.tensor(p + "mlp.moe_statics.e_score_correction_bias", T.FFN_EXP_PROBS_B, "router", bid,
                           suffix="bias", transform=lambda b: b.reshape(-1))
        bias.shape = (self.spec.n_experts,)
        out += [*self.hf_routed_experts(bid), bias]
        if self.spec.n_shared_experts:
            out += self.shared_ffn(bid, p + "mlp.shared_experts")
        return out
