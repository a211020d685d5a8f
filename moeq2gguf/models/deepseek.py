"""DeepSeekMoE (DeepseekForCausalLM, e.g. deepseek-moe-16b) -> llama.cpp arch `deepseek`.

The hub checkpoint runs remote code (transformers has no class). Llama attention (q/k/v/o, no
biases, rotate-half RoPE: q and k rows are permuted to llama.cpp's adjacent pairs, as for Mixtral);
the first first_k_dense_replace layers have a dense SwiGLU `mlp.{gate,up,down}_proj`
(intermediate_size), the others a router `mlp.gate` over n_routed_experts fine-grained experts
`mlp.experts.E.{gate,up,down}_proj` (moe_intermediate_size) and n_shared_experts fused into
`mlp.shared_experts.*` (width moe_intermediate_size * n_shared_experts), added unweighted.
Routing: softmax, top-k, not renormalised (llama.cpp's deepseek graph hard-codes that, so
norm_topk_prob=true is refused), expert_weights_scale 1.
"""
from __future__ import annotations

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value, rope_theta_of
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


@register
class DeepseekMoeAdapter(FamilyAdapter):
    hf_architectures = ("DeepseekForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK
    family = "deepseek"
    default_pre_tokenizer = "deepseek-llm"

    def make_spec(self, config: dict) -> ModelSpec:
        if config.get("norm_topk_prob"):
            raise Moeq2ggufError("norm_topk_prob=true: llama.cpp's deepseek graph never renormalises the top-k weights")
        if (config.get("scoring_func") or "softmax") != "softmax":
            raise Moeq2ggufError(f"scoring_func={config['scoring_func']!r}: llama.cpp's deepseek graph scores experts by softmax")
        if config.get("moe_layer_freq", 1) != 1:
            raise Moeq2ggufError(f"moe_layer_freq={config['moe_layer_freq']}: llama.cpp's deepseek graph only has "
                                 "leading dense layers (first_k_dense_replace), not interleaved ones")
        if config.get("attention_bias"):
            raise Moeq2ggufError("attention_bias=true: llama.cpp's deepseek graph has no attention output bias")
        n_layers = config_value(config, "num_hidden_layers")
        hidden = config_value(config, "hidden_size")
        n_heads = config_value(config, "num_attention_heads")
        n_shared = int(config.get("n_shared_experts") or 0)
        if not n_shared:
            raise Moeq2ggufError("n_shared_experts=0: llama.cpp's deepseek graph requires shared experts")
        expert_width = config_value(config, "moe_intermediate_size")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=hidden // n_heads,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=rope_theta_of(config, 10000.0),
            n_experts=config_value(config, "n_routed_experts"), n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=expert_width, routing=Routing(scoring="softmax", renormalize=False),
            n_shared_experts=n_shared, shared_expert_width=expert_width * n_shared,
            dense_width=config_value(config, "intermediate_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(int(config.get("first_k_dense_replace") or 0), n_layers)),
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        self.add_common_metadata(writer)
        writer.add_feed_forward_length(s.dense_width)
        writer.add_leading_dense_block_count(len(s.dense_layers))
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_expert_shared_count(s.n_shared_experts)
        writer.add_expert_weights_scale(1.0)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        s = self.spec
        p = f"model.layers.{bid}."
        out = self.llama_attention(bid, permute_qk=True)
        if bid not in s.moe_layers:
            return out + self.dense_ffn(bid, p + "mlp")
        return out + [*self.hf_routed_experts(bid, fused=False), *self.shared_ffn(bid, p + "mlp.shared_experts")]
