"""Qwen3.5 / 3.6 MoE (Qwen3_5MoeForCausalLM, and the text part of Qwen3_5MoeForConditionalGeneration, the hub
layout) -> llama.cpp arch `qwen35moe`.

A hybrid: most layers are Gated DeltaNet linear attention (`linear_attn.*`), every full_attention_interval-th
(4th) layer is gated full attention (`self_attn.*`); every layer has a softmax-routed MoE (renormalised top-k,
llama.cpp hard-codes it) plus one shared expert scaled by sigmoid(`shared_expert_gate`).

Full attention: q_proj gives per head [q | gate] (2 x head_dim rows); per-head RMSNorm on q and k; partial
RoPE (head_dim * partial_rotary_factor dimensions, NeoX halves; llama.cpp runs interleaved M-RoPE, which for
text positions is the same rotation); the attention output is multiplied by sigmoid(gate) before o_proj.

Linear attention, as llama.cpp's converter lays it out: in_proj_qkv -> attn_qkv, in_proj_z -> attn_gate,
in_proj_b -> ssm_beta, in_proj_a -> ssm_alpha, conv1d [C, 1, K] -> ssm_conv1d [C, K], dt_bias -> ssm_dt.bias,
A_log -> ssm_a = -exp(A_log), norm -> ssm_norm, out_proj -> ssm_out. With fewer key than value heads, the
value heads are reordered from grouped by key head (HF: value head g*r + j reads key head g) to tiled
(GGUF: value head j*n_k + g reads key head g = h % n_k), in every tensor indexed by value head.

The RMSNorms are zero-centred (they scale by 1 + w): their weights are written as 1 + w, except the gated
norm of the linear attention, which scales by w. Vision tower (`model.visual.*`) and the MTP block (`mtp.*`)
are left out.
"""
from __future__ import annotations

import gguf
import torch

from moeq2gguf.errors import CheckpointError, Moeq2ggufError
from moeq2gguf.models.base import (FamilyAdapter, LinearAttention, ModelSpec, Routing, TensorSource, config_value,
                                   rope_theta_of)
from moeq2gguf.models.glm4moe import partial_rotary_factor
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR


def tiled_value_heads(t: torch.Tensor, dim: int, n_k: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Reorder value heads along dim from grouped ([g0v0..g0v(r-1), g1v0, ...]) to tiled ([g0v0, g1v0, ..., g0v1, ...])."""
    if per_k == 1:
        return t
    dim = dim % t.dim()
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], n_k, per_k, head_dim, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape).contiguous()


@register
class Qwen35MoeAdapter(FamilyAdapter):
    hf_architectures = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
    gguf_arch = gguf.MODEL_ARCH.QWEN35MOE
    family = "qwen35moe"
    default_pre_tokenizer = "qwen35"

    def __init__(self, reader):
        # the hub checkpoints are the multimodal class: text weights under model.language_model.
        self.prefix = "model.language_model." if reader.has("model.language_model.embed_tokens.weight") else "model."
        super().__init__(reader)

    @staticmethod
    def text_config(config: dict) -> dict:
        return {**config, **(config.get("text_config") or {}), "architectures": config.get("architectures")}

    def make_spec(self, config: dict) -> ModelSpec:
        c = self.text_config(config)
        n_layers = config_value(c, "num_hidden_layers")
        hidden = config_value(c, "hidden_size")
        n_heads = config_value(c, "num_attention_heads")
        head_dim = config_value(c, "head_dim", default=hidden // n_heads)
        if c.get("attention_bias"):
            raise Moeq2ggufError("attention_bias=true: llama.cpp's qwen35moe graph has no attention biases")
        layer_types = c.get("layer_types")
        interval = int(c.get("full_attention_interval") or 4)
        if layer_types and "full_attention" in layer_types and not c.get("full_attention_interval"):
            interval = layer_types.index("full_attention") + 1
        layer_types = layer_types or ["linear_attention" if (i + 1) % interval else "full_attention"
                                      for i in range(n_layers)]
        linear = tuple(i for i, kind in enumerate(layer_types) if kind == "linear_attention")
        if linear != tuple(i for i in range(n_layers) if (i + 1) % interval):
            raise Moeq2ggufError(f"layer_types is not one full-attention layer every {interval}: llama.cpp's qwen35moe "
                                 "reads the layer kinds from full_attention_interval, so this file would run other layers")
        lin = LinearAttention(n_k_heads=config_value(c, "linear_num_key_heads"),
                              n_v_heads=config_value(c, "linear_num_value_heads"),
                              head_k_dim=config_value(c, "linear_key_head_dim"),
                              head_v_dim=config_value(c, "linear_value_head_dim"),
                              conv_kernel=config_value(c, "linear_conv_kernel_dim"))
        if lin.head_k_dim != lin.head_v_dim or lin.n_v_heads % lin.n_k_heads:
            raise Moeq2ggufError(f"linear attention with key head size {lin.head_k_dim}, value head size {lin.head_v_dim}, "
                                 f"{lin.n_k_heads} key and {lin.n_v_heads} value heads: llama.cpp needs equal head sizes "
                                 "and value heads a multiple of key heads")
        rope_dim = int(head_dim * partial_rotary_factor(c, 0.25))
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(c, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(c, "num_key_value_heads", default=n_heads), head_dim=head_dim,
            context_length=config_value(c, "max_position_embeddings"),
            rms_norm_eps=config_value(c, "rms_norm_eps", default=1e-6), rope_theta=rope_theta_of(c, 10000000.0),
            n_experts=config_value(c, "num_experts"), n_experts_used=config_value(c, "num_experts_per_tok"),
            expert_width=config_value(c, "moe_intermediate_size"),
            routing=Routing(scoring="softmax", renormalize=True),
            shared_expert_width=config_value(c, "shared_expert_intermediate_size"), shared_expert_gated=True,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)), qk_norm="head", rope_dim=rope_dim,
            attn_output_gate=True, linear_attention=lin, linear_layers=linear,
        )

    @property
    def full_attention_interval(self) -> int:
        full = [i for i in range(self.spec.n_layers) if i not in self.spec.linear_layers]
        return full[0] + 1 if full else self.spec.n_layers + 1

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s, lin = self.spec, self.spec.linear_attention
        self.add_common_metadata(writer)
        if s.head_dim * s.n_heads == s.hidden_size:   # llama.cpp's converter always writes them
            writer.add_key_length(s.head_dim)
            writer.add_value_length(s.head_dim)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_expert_shared_feed_forward_length(s.shared_expert_width)
        writer.add_ssm_conv_kernel(lin.conv_kernel)
        writer.add_ssm_state_size(lin.head_k_dim)
        writer.add_ssm_group_count(lin.n_k_heads)
        writer.add_ssm_time_step_rank(lin.n_v_heads)
        writer.add_ssm_inner_size(lin.value_dim)
        writer.add_full_attention_interval(self.full_attention_interval)
        sections = list((self.text_config(self.config).get("rope_parameters") or {}).get("mrope_section") or [11, 11, 10])
        writer.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])

    def ignored(self, name: str) -> bool:
        return name.startswith(("model.visual.", "mtp.", "model.mtp."))

    # --- tensors ---------------------------------------------------------------------------------
    def _t(self, hf_name: str, tensor: gguf.MODEL_TENSOR, role: str, bid: int | None = None, suffix: str = "weight",
           transform=None) -> TensorSource:
        return self.tensor(hf_name, tensor, role, bid, suffix=suffix, transform=transform)

    def _norm(self, hf_name: str, tensor: gguf.MODEL_TENSOR, bid: int | None = None) -> TensorSource:
        return self._t(hf_name, tensor, "norm", bid, transform=lambda w: w + 1)   # zero-centred RMSNorm

    def head_tensors(self) -> list[TensorSource]:
        return [self._t(self.prefix + "embed_tokens.weight", T.TOKEN_EMBD, "embedding")]

    def tail_tensors(self) -> list[TensorSource]:
        out = [self._norm(self.prefix + "norm.weight", T.OUTPUT_NORM)]
        if self.reader.has("lm_head.weight"):
            out.append(self._t("lm_head.weight", T.OUTPUT, "output"))
        elif not self.spec.tie_embeddings:
            raise CheckpointError("lm_head.weight is missing and tie_word_embeddings is false; the checkpoint is incomplete")
        return out

    def _linear_attention(self, bid: int) -> list[TensorSource]:
        lin = self.spec.linear_attention
        p = f"{self.prefix}layers.{bid}.linear_attn."
        n_k, per_k, dv = lin.n_k_heads, lin.n_v_heads // lin.n_k_heads, lin.head_v_dim

        def values(dim: int, head_dim: int):
            return lambda w: tiled_value_heads(w, dim, n_k, per_k, head_dim)

        def qkv(w: torch.Tensor) -> torch.Tensor:   # only the value rows (or channels) move
            return torch.cat([w[:2 * lin.key_dim], tiled_value_heads(w[2 * lin.key_dim:], 0, n_k, per_k, dv)])

        conv = self._t(p + "conv1d.weight", T.SSM_CONV1D, "conv", bid, transform=lambda w: qkv(w.reshape(w.shape[0], -1)))
        conv.shape = (self.reader.shape(p + "conv1d.weight")[0], lin.conv_kernel)
        return [
            self._t(p + "in_proj_qkv.weight", T.ATTN_QKV, "attention", bid, transform=qkv),
            self._t(p + "in_proj_z.weight", T.ATTN_GATE, "attention", bid, transform=values(0, dv)),
            self._t(p + "in_proj_b.weight", T.SSM_BETA, "attention", bid, transform=values(0, 1)),
            self._t(p + "in_proj_a.weight", T.SSM_ALPHA, "attention", bid, transform=values(0, 1)),
            conv,
            self._t(p + "dt_bias", T.SSM_DT, "bias", bid, suffix="bias", transform=values(0, 1)),
            self._t(p + "A_log", T.SSM_A, "bias", bid, suffix="", transform=lambda a: tiled_value_heads(-torch.exp(a), 0, n_k, per_k, 1)),
            self._t(p + "norm.weight", T.SSM_NORM, "norm", bid),
            self._t(p + "out_proj.weight", T.SSM_OUT, "attention", bid, transform=values(1, dv)),
        ]

    def _full_attention(self, bid: int) -> list[TensorSource]:
        p = f"{self.prefix}layers.{bid}.self_attn."
        return [
            self._t(p + "q_proj.weight", T.ATTN_Q, "attention", bid),
            self._t(p + "k_proj.weight", T.ATTN_K, "attention", bid),
            self._t(p + "v_proj.weight", T.ATTN_V, "attention", bid),
            self._t(p + "o_proj.weight", T.ATTN_OUT, "attention", bid),
            self._norm(p + "q_norm.weight", T.ATTN_Q_NORM, bid),
            self._norm(p + "k_norm.weight", T.ATTN_K_NORM, bid),
        ]

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"{self.prefix}layers.{bid}."
        attention = self._linear_attention(bid) if bid in self.spec.linear_layers else self._full_attention(bid)
        m = p + "mlp."
        return [
            self._norm(p + "input_layernorm.weight", T.ATTN_NORM, bid),
            *attention,
            self._norm(p + "post_attention_layernorm.weight", T.ATTN_POST_NORM, bid),
            self._t(m + "gate.weight", T.FFN_GATE_INP, "router", bid),
            *self.stacked_experts(
                bid,
                {T.FFN_GATE_EXP: m + "experts.{e}.gate_proj.weight", T.FFN_UP_EXP: m + "experts.{e}.up_proj.weight",
                 T.FFN_DOWN_EXP: m + "experts.{e}.down_proj.weight"},
                fused_gate_up=m + "experts.gate_up_proj", fused_down=m + "experts.down_proj"),
            self._t(m + "shared_expert_gate.weight", T.FFN_GATE_INP_SHEXP, "router", bid),
            *self.shared_ffn(bid, m + "shared_expert"),
        ]
