"""DeepSeek-V2 / V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM) -> llama.cpp arch `deepseek2`.

Multi-head latent attention (MLA): q from `q_proj` (the "lite" layout, V2-Lite) or from
`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`; keys and values from one compressed latent:
`kv_a_proj_with_mqa` gives [kv_lora_rank latent | qk_rope_head_dim shared rotary key], the latent is
normalised (`kv_a_layernorm`) and expanded per head by `kv_b_proj` [H*(nope+v), kv_lora].
llama.cpp runs the absorbed form, so kv_b is split per head into attn_k_b [H, kv_lora, nope]
(k part, transposed) and attn_v_b [H, v, kv_lora]; the cache holds the latent (MQA: one kv head of
kv_lora + rope). RoPE: llama.cpp rotates adjacent pairs (NORM) of the rotary part, as DeepSeek's
weights are laid out (V2's complex rotation, V3's rope_interleave=true); a V3 checkpoint with
rope_interleave=false rotates halves, so its rotary rows are permuted to pairs.

FFN: the first first_k_dense_replace layers are dense (`mlp.{gate,up,down}_proj`), the rest MoE:
router `mlp.gate`, routed experts `mlp.experts.E.*`, n_shared_experts fused into
`mlp.shared_experts.*` (width moe_intermediate_size * n_shared_experts), added unweighted.
Routing as llama.cpp executes it (build_moe_ffn):
  V2: softmax, top-k, times routed_scaling_factor (norm_topk_prob=true is refused: DeepSeek's code
      and transformers disagree on it, and no released V2 sets it);
  V3: sigmoid; the selection adds `mlp.gate.e_score_correction_bias` (GGUF exp_probs_b), the
      weights do not; experts in n_group groups, each scored by its two best biased scores, top
      topk_group groups compete; renormalised (norm_topk_prob), times routed_scaling_factor.
V2's group_limited_greedy scores a group by its best expert, not its best two: llama.cpp has only
the V3 rule, so such a file (DeepSeek-V2/V2.5 236B, n_group 8) can choose other groups than the
reference for some tokens; we convert it with a warning, as llama.cpp's own converter does silently.
The multi-token-prediction layer of V3 checkpoints (layer index num_hidden_layers) is left out.
FP8 checkpoints (weight_scale_inv tensors) must be dequantized to BF16 first.
"""
from __future__ import annotations

import logging

import gguf
import torch

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import (MLA, FamilyAdapter, ModelSpec, Routing, TensorSource, add_rope_scaling,
                                   config_value, rope_parameters_of)
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR
log = logging.getLogger(__name__)


def rope_rows_halves_to_pairs(weight: torch.Tensor, n_heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Within each head's last rope_dim output rows, reorder [x0..x(r/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    w = weight.reshape(n_heads, head_dim, *weight.shape[1:]).clone()
    rope = w[:, head_dim - rope_dim:]
    w[:, head_dim - rope_dim:] = (rope.reshape(n_heads, 2, rope_dim // 2, *weight.shape[1:])
                                  .transpose(1, 2).reshape(rope.shape))
    return w.reshape(weight.shape)


@register
class DeepseekV2Adapter(FamilyAdapter):
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2
    family = "deepseek2"
    default_pre_tokenizer = "deepseek-llm"

    def __init__(self, reader):
        super().__init__(reader)
        if self.spec.hf_architecture == "DeepseekV3ForCausalLM":
            self.default_pre_tokenizer = "deepseek-v3"

    def make_spec(self, config: dict) -> ModelSpec:
        arch = config["architectures"][0]
        is_v3 = arch == "DeepseekV3ForCausalLM"
        if config.get("attention_bias"):
            raise Moeq2ggufError("attention_bias=true: llama.cpp's deepseek2 graph has no attention biases")
        if config.get("moe_layer_freq", 1) != 1:
            raise Moeq2ggufError(f"moe_layer_freq={config['moe_layer_freq']}: llama.cpp's deepseek2 graph only has "
                                 "leading dense layers (first_k_dense_replace), not interleaved ones")
        if not is_v3 and config.get("norm_topk_prob"):
            raise Moeq2ggufError(
                "norm_topk_prob=true on DeepSeek-V2: DeepSeek's code then renormalises and skips "
                "routed_scaling_factor, transformers' DeepseekV2 scales and never renormalises; no released V2 "
                "sets it, and the file could not match both, so it is refused")
        n_layers = config_value(config, "num_hidden_layers")
        n_heads = config_value(config, "num_attention_heads")
        n_dense = int(config.get("first_k_dense_replace") or 0)
        mla = MLA(q_lora_rank=int(config.get("q_lora_rank") or 0),
                  kv_lora_rank=config_value(config, "kv_lora_rank"),
                  qk_nope_head_dim=config_value(config, "qk_nope_head_dim"),
                  qk_rope_head_dim=config_value(config, "qk_rope_head_dim"),
                  v_head_dim=config_value(config, "v_head_dim"))
        scoring = config.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise Moeq2ggufError(f"scoring_func={scoring!r} is not supported; llama.cpp's deepseek2 graph has softmax and sigmoid")
        topk_method = config.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
        if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise Moeq2ggufError(f"topk_method={topk_method!r} is not supported; known: greedy, group_limited_greedy, noaux_tc")
        n_groups, n_groups_used = 1, 1
        if topk_method != "greedy":
            n_groups, n_groups_used = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
        if topk_method == "group_limited_greedy" and 1 < n_groups and n_groups_used < n_groups:
            log.warning("topk_method=group_limited_greedy ranks expert groups by their best expert; llama.cpp ranks "
                        "them by their best two, so some tokens may be routed to other groups than in the reference")
        n_experts = config_value(config, "n_routed_experts", "num_local_experts", "num_experts")
        theta, rope_scaling = rope_parameters_of(config, 10000.0)
        return ModelSpec(
            family=self.family, hf_architecture=arch, gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=config_value(config, "hidden_size"),
            n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps", default=1e-6), rope_theta=theta,
            n_experts=n_experts, n_experts_used=config_value(config, "num_experts_per_tok"),
            expert_width=config_value(config, "moe_intermediate_size"),
            routing=Routing(scoring=scoring, renormalize=bool(config.get("norm_topk_prob", False)),
                            scale=float(config.get("routed_scaling_factor") or 1.0),
                            selection_bias=topk_method == "noaux_tc", n_groups=n_groups, n_groups_used=n_groups_used),
            n_shared_experts=int(config.get("n_shared_experts") or 0),
            shared_expert_width=config_value(config, "moe_intermediate_size") * int(config.get("n_shared_experts") or 0),
            dense_width=config_value(config, "intermediate_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_dense, n_layers)), mla=mla, rope_dim=mla.qk_rope_head_dim,
            rope_scaling=rope_scaling,
        )

    @property
    def rope_interleaved(self) -> bool:
        """Whether the checkpoint's rotary rows are already in adjacent pairs (llama.cpp's layout)."""
        return self.spec.hf_architecture != "DeepseekV3ForCausalLM" or bool(self.config.get("rope_interleave", True))

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s, mla = self.spec, self.spec.mla
        writer.add_context_length(s.context_length)
        writer.add_embedding_length(s.hidden_size)
        writer.add_block_count(s.n_layers)
        writer.add_feed_forward_length(s.dense_width)
        writer.add_head_count(s.n_heads)
        writer.add_head_count_kv(1)  # the absorbed form is MQA over the latent
        writer.add_rope_freq_base(s.rope_theta)
        writer.add_rope_dimension_count(mla.qk_rope_head_dim)
        add_rope_scaling(writer, s.rope_scaling)
        writer.add_layer_norm_rms_eps(s.rms_norm_eps)
        writer.add_vocab_size(s.vocab_size)
        writer.add_q_lora_rank(mla.q_lora_rank)  # 0 = lite layout; llama.cpp needs the key unless 26/27 layers
        writer.add_kv_lora_rank(mla.kv_lora_rank)
        writer.add_key_length(mla.kv_lora_rank + mla.qk_rope_head_dim)
        writer.add_value_length(mla.kv_lora_rank)
        writer.add_key_length_mla(mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        writer.add_value_length_mla(mla.v_head_dim)
        writer.add_leading_dense_block_count(len(s.dense_layers))
        writer.add_expert_count(s.n_experts)
        writer.add_expert_used_count(s.n_experts_used)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_expert_shared_count(s.n_shared_experts)
        writer.add_expert_weights_scale(s.routing.scale)
        writer.add_expert_weights_norm(s.routing.renormalize)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if s.routing.scoring == "sigmoid"
                                      else gguf.ExpertGatingFuncType.SOFTMAX)
        if s.routing.n_groups > 1:
            writer.add_expert_group_count(s.routing.n_groups)
            writer.add_expert_group_used_count(s.routing.n_groups_used)

    def ignored(self, name: str) -> bool:
        parts = name.split(".")
        return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= self.spec.n_layers)

    def _attention(self, bid: int) -> list[TensorSource]:
        s, mla = self.spec, self.spec.mla
        p = f"model.layers.{bid}.self_attn."
        pairs = self.rope_interleaved
        q_fix = None if pairs else (lambda w: rope_rows_halves_to_pairs(w, s.n_heads, s.head_dim, mla.qk_rope_head_dim))
        kv_fix = None if pairs else (lambda w: rope_rows_halves_to_pairs(
            w, 1, mla.kv_lora_rank + mla.qk_rope_head_dim, mla.qk_rope_head_dim))
        if self.reader.has(p + "q_proj.weight"):
            if mla.q_lora_rank:
                raise Moeq2ggufError(f"q_lora_rank={mla.q_lora_rank} but layer {bid} has a plain q_proj; config.json does not match the weights")
            out = [self.tensor(p + "q_proj.weight", T.ATTN_Q, "attention", bid, transform=q_fix)]
        else:
            out = [self.tensor(p + "q_a_proj.weight", T.ATTN_Q_A, "attention", bid),
                   self.tensor(p + "q_a_layernorm.weight", T.ATTN_Q_A_NORM, "norm", bid),
                   self.tensor(p + "q_b_proj.weight", T.ATTN_Q_B, "attention", bid, transform=q_fix)]
        kv_b = p + "kv_b_proj.weight"
        nope, v = mla.qk_nope_head_dim, mla.v_head_dim

        def per_head(w: torch.Tensor) -> torch.Tensor:   # [H*(nope+v), kv_lora] -> [H, nope+v, kv_lora]
            return w.reshape(s.n_heads, nope + v, mla.kv_lora_rank)

        k_b = self.tensor(kv_b, T.ATTN_K_B, "attention", bid,
                          transform=lambda w: per_head(w)[:, :nope].transpose(1, 2).contiguous())
        k_b.shape = (s.n_heads, mla.kv_lora_rank, nope)
        v_b = self.tensor(kv_b, T.ATTN_V_B, "attention", bid, transform=lambda w: per_head(w)[:, nope:].contiguous())
        v_b.shape = (s.n_heads, v, mla.kv_lora_rank)
        out += [
            self.tensor(p + "kv_a_proj_with_mqa.weight", T.ATTN_KV_A_MQA, "attention", bid, transform=kv_fix),
            self.tensor(p + "kv_a_layernorm.weight", T.ATTN_KV_A_NORM, "norm", bid),
            k_b, v_b,
            self.tensor(p + "o_proj.weight", T.ATTN_OUT, "attention", bid),
        ]
        return out

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        out = [self.tensor(p + "input_layernorm.weight", T.ATTN_NORM, "norm", bid), *self._attention(bid),
               self.tensor(p + "post_attention_layernorm.weight", T.FFN_NORM, "norm", bid)]
        if bid not in self.spec.moe_layers:
            return out + self.dense_ffn(bid, p + "mlp")
        out.append(self.tensor(p + "mlp.gate.weight", T.FFN_GATE_INP, "router", bid))
        if self.spec.routing.selection_bias:
            out.append(self.tensor(p + "mlp.gate.e_score_correction_bias", T.FFN_EXP_PROBS_B, "router", bid, suffix="bias"))
        out += self.stacked_experts(
            bid,
            {T.FFN_GATE_EXP: p + "mlp.experts.{e}.gate_proj.weight",
             T.FFN_UP_EXP: p + "mlp.experts.{e}.up_proj.weight",
             T.FFN_DOWN_EXP: p + "mlp.experts.{e}.down_proj.weight"},
            fused_gate_up=p + "mlp.experts.gate_up_proj", fused_down=p + "mlp.experts.down_proj")
        if self.spec.n_shared_experts:
            out += self.shared_ffn(bid, p + "mlp.shared_experts")
        return out
