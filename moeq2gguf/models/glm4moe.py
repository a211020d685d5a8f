"""GLM-4.5 / 4.6 MoE (Glm4MoeForCausalLM: GLM-4.5, GLM-4.5-Air, GLM-4.6) -> llama.cpp arch `glm4moe`.

Attention: q/k/v with biases (attention_bias), no output bias, an optional RMSNorm over each head of
q and k (use_qk_norm: GLM-4.5 355B), GQA with its own head_dim, and *partial* RoPE: only the first
head_dim * partial_rotary_factor (0.5) dimensions of each head rotate, NeoX-style (halves), on both
sides, so no permutation. The FFN input norm is `post_attention_layernorm`, which llama.cpp's
glm4moe graph names `post_attention_norm` (ATTN_POST_NORM), not ffn_norm.

FFN: the first first_k_dense_replace layers are dense; the rest have a router `mlp.gate` with a
selection bias `mlp.gate.e_score_correction_bias` (exp_probs_b), routed experts `mlp.experts.E.*`
and n_shared_experts shared experts `mlp.shared_experts.*` added unweighted. Routing is DeepSeek-V3's:
sigmoid scores, the bias only in the choice, optional expert groups (n_group / topk_group),
renormalised (norm_topk_prob), times routed_scaling_factor.

The multi-token-prediction layers (layer index >= num_hidden_layers, num_nextn_predict_layers of
them) are left out: llama.cpp's main graph never runs them, and its loader accepts a trunk-only file.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


def partial_rotary_factor(config: dict, default: float) -> float:
    """partial_rotary_factor from rope_parameters (transformers 5) or the top level (hub config.json)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    value = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return float(default if value is None else value)


@register
class Glm4MoeAdapter(FamilyAdapter):
    hf_architectures = ("Glm4MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GLM4_MOE
    family = "glm4moe"
    default_pre_tokenizer = "glm4"

    def make_spec(self, config: dict) -> ModelSpec:
        n_layers = config_value(config, "num_hidden_layers")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        head_dim = config_value(config, "head_dim", default=hidden // n_heads)
        rope_dim = int(head_dim * partial_rotary_factor(config, 0.5))
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise Moeq2ggufError(f"partial_rotary_factor gives {rope_dim} rotary dimensions of a {head_dim}-wide head; "
                                 "it must be an even number between 2 and head_dim")
        n_experts = config_value(config, "n_routed_experts", "num_local_experts", "num_experts")
        n_groups, n_groups_used = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
        if n_groups > 1 and n_experts % n_groups:
            raise Moeq2ggufError(f"n_group={n_groups} does not divide the {n_experts} routed experts; config.json is inconsistent")
        n_dense = int(config.get("first_k_dense_replace") or 0)
        n_shared = int(config.get("n_shared_experts") or 0)
        expert_width = config_value(config, "moe_intermediate_size")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads), head_dim=head_dim,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps", default=1e-5), rope_theta=rope_theta_of(config, 10000.0),
            n_experts=n_experts, n_experts_used=config_value(config, "num_experts_per_tok"), expert_width=expert_width,
            routing=Routing(scoring="sigmoid", renormalize=bool(config.get("norm_topk_prob", True)),
                            scale=float(config.get("routed_scaling_factor") or 1.0), selection_bias=True,
                            n_groups=n_groups if n_groups_used < n_groups else 1,
                            n_groups_used=n_groups_used if n_groups_used < n_groups else 1),
            n_shared_experts=n_shared, shared_expert_width=expert_width * n_shared,
            dense_width=config_value(config, "intermediate_size"),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_dense, n_layers)), qk_norm="head" if config.get("use_qk_norm") else "",
            rope_dim=rope_dim,
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(s.dense_width)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_expert_shared_count(s.n_shared_experts)
        writer.add_leading_dense_block_count(len(s.dense_layers))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_scale(s.routing.scale)
        writer.add_expert_weights_norm(s.routing.renormalize)
        if s.routing.n_groups > 1:
            writer.add_expert_group_count(s.routing.n_groups)
            writer.add_expert_group_used_count(s.routing.n_groups_used)

    def ignored(self, name: str) -> bool:
        parts = name.split(".")
        return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= self.spec.n_layers)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        out = self.llama_attention(bid, biases=self.spec.attention_bias, qk_norm=bool(self.spec.qk_norm))
        # glm4moe's graph reads the FFN input norm as attn_post_norm
        out[-1] = self.tensor(p + "post_attention_layernorm.weight", T.ATTN_POST_NORM, "norm", bid)
        if bid not in self.spec.moe_layers:
            return out + self.dense_ffn(bid, p + "mlp")
        out += [*self.hf_routed_experts(bid),
                self.tensor(p + "mlp.gate.e_score_correction_bias", T.FFN_EXP_PROBS_B, "router", bid, suffix="bias")]
        if self.spec.n_shared_experts:
            out += self.shared_ffn(bid, p + "mlp.shared_experts")
        return out
