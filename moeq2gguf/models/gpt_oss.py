"""GPT-OSS (GptOssForCausalLM) -> llama.cpp arch `gpt-oss`.

Attention: q/k/v/o with biases, a learned per-head sink logit (`self_attn.sinks` -> attn_sinks)
that joins every softmax, sliding-window layers alternating with full ones (config layer_types,
written as sliding_window_pattern), NeoX RoPE on both sides (no permutation). The FFN norm is
`post_attention_layernorm` (GGUF attn_post_norm). llama.cpp requires `output`: a tied checkpoint
gets a copy of the embeddings. Router `mlp.router` has a bias; routing is top-k on the logits, then
softmax over the k chosen (llama.cpp's SOFTMAX_WEIGHT gating, hard-coded).
Experts use llama.cpp's swiglu_oai with its constants alpha 1.702 and limit 7:
(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7); other values are refused.

Expert tensors come in two on-disk layouts:
- float (transformers' save_pretrained): `mlp.experts.gate_up_proj` [E, in, 2*ff] with gate and up
  interleaved along the last axis (gate = even columns), `down_proj` [E, ff, out]: both transposed
  relative to nn.Linear, so they are split and transposed to [E, ff, in] / [E, out, ff];
- MXFP4 (the released checkpoints): `*_blocks` uint8 [E, rows, in/32, 16] and `*_scales` uint8
  [E, rows, in/32] (E8M0 exponents, bias 127), rows in nn.Linear orientation, gate/up interleaved
  along rows. Each 16-byte block packs elements (2j, 2j+1) into the low/high nibbles of byte j.
  These become GGML MXFP4 blocks {e, qs[16]} with element j in the low and j+16 in the high nibble
  of qs[j]; the nibble codes and the exponent byte are the same in both formats (ggml's values are
  the doubled e2m1 values times half the scale). TensorSource.load() gives the exact float values
  (so float export works and is lossless), load_raw() the GGML blocks for a writer that keeps MXFP4.
Expert biases `gate_up_proj_bias` [E, 2*ff] (interleaved) and `down_proj_bias` [E, out] stay F32.
"""
from __future__ import annotations

import gguf
import torch

from moeq2gguf.errors import CheckpointError, Moeq2ggufError
from moeq2gguf.models.base import (FamilyAdapter, ModelSpec, Routing, TensorSource, add_rope_scaling, config_value,
                                   rope_parameters_of)
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR
MXFP4 = gguf.GGMLQuantizationType.MXFP4
# e2m1 code -> value (OCP microscaling spec); the code's top bit is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
LLAMA_SWIGLU_ALPHA, LLAMA_SWIGLU_LIMIT = 1.702, 7.0


def _codes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., G, 16] -> nibble codes [..., G, 32] in element order (HF: low nibble first)."""
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 blocks [..., G, 16] and E8M0 scales [..., G] -> float32 [..., G*32]."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[_codes(blocks).long()]
    out = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 blocks [..., G, 16] and scales [..., G] -> GGML block_mxfp4 bytes [..., G*17]."""
    codes = _codes(blocks)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = torch.cat((scales.unsqueeze(-1), qs), dim=-1)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17).contiguous()


@register
class GptOssAdapter(FamilyAdapter):
    hf_architectures = ("GptOssForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPT_OSS
    family = "gpt-oss"
    default_pre_tokenizer = "gpt-4o"
    requires_output = True

    def make_spec(self, config: dict) -> ModelSpec:
        alpha = float(config.get("swiglu_alpha", LLAMA_SWIGLU_ALPHA))
        limit = float(config.get("swiglu_limit", LLAMA_SWIGLU_LIMIT))
        if (alpha, limit) != (LLAMA_SWIGLU_ALPHA, LLAMA_SWIGLU_LIMIT):
            raise Moeq2ggufError(f"swiglu_alpha={alpha}, swiglu_limit={limit}: llama.cpp's gpt-oss graph hard-codes "
                                 f"{LLAMA_SWIGLU_ALPHA} and {LLAMA_SWIGLU_LIMIT}")
        if not config.get("attention_bias", True):
            raise Moeq2ggufError("attention_bias=false: llama.cpp's gpt-oss graph requires the attention output bias")
        n_layers = config_value(config, "num_hidden_layers")
        n_heads = config_value(config, "num_attention_heads")
        hidden = config_value(config, "hidden_size")
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        if len(layer_types) != n_layers:
            raise CheckpointError(f"config.json layer_types has {len(layer_types)} entries for {n_layers} layers")
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise Moeq2ggufError(f"layer type {unknown[0]!r} is not supported; gpt-oss layers are sliding_attention or full_attention")
        theta, rope_scaling = rope_parameters_of(config, 150000.0)
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(config, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(config, "num_key_value_heads", default=n_heads),
            head_dim=config_value(config, "head_dim", default=hidden // n_heads),
            context_length=config_value(config, "max_position_embeddings"),
            rms_norm_eps=config_value(config, "rms_norm_eps"), rope_theta=theta, rope_scaling=rope_scaling,
            n_experts=config_value(config, "num_local_experts", "num_experts"),
            n_experts_used=config_value(config, "num_experts_per_tok", "experts_per_token"),
            expert_width=config_value(config, "intermediate_size"),
            routing=Routing(scoring="softmax_topk", router_bias=True),
            attention_bias=True, attention_out_bias=True, attention_sinks=True,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(range(n_layers)),
            sliding_window=config_value(config, "sliding_window"),
            swa_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"),
            expert_activation="swiglu_oai", expert_bias=True, swiglu_alpha=alpha, swiglu_limit=limit,
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        self.add_common_metadata(writer)
        add_rope_scaling(writer, s.rope_scaling)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_sliding_window(s.sliding_window)
        writer.add_sliding_window_pattern([i in s.swa_layers for i in range(s.n_layers)])

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}."
        out = [self.tensor(p + "input_layernorm.weight", T.ATTN_NORM, "norm", bid)]
        for proj, kind in (("q_proj", T.ATTN_Q), ("k_proj", T.ATTN_K), ("v_proj", T.ATTN_V), ("o_proj", T.ATTN_OUT)):
            out.append(self.tensor(p + f"self_attn.{proj}.weight", kind, "attention", bid))
            out.append(self.tensor(p + f"self_attn.{proj}.bias", kind, "bias", bid, suffix="bias"))
        out += [
            self.tensor(p + "self_attn.sinks", T.ATTN_SINKS, "norm", bid),
            self.tensor(p + "post_attention_layernorm.weight", T.ATTN_POST_NORM, "norm", bid),
            self.tensor(p + "mlp.router.weight", T.FFN_GATE_INP, "router", bid),
            self.tensor(p + "mlp.router.bias", T.FFN_GATE_INP, "bias", bid, suffix="bias"),
            *self._experts(bid),
        ]
        return out

    def _experts(self, bid: int) -> list[TensorSource]:
        p = f"model.layers.{bid}.mlp.experts."
        gate_up_b, down_b = p + "gate_up_proj_bias", p + "down_proj_bias"
        if self.reader.has(p + "gate_up_proj_blocks"):
            weights = self._mxfp4_experts(bid, p)
        elif self.reader.has(p + "gate_up_proj"):
            weights = [
                self.tensor(p + "gate_up_proj", T.FFN_GATE_EXP, "expert", bid,
                            transform=lambda w: w[..., 0::2].transpose(1, 2).contiguous()),
                self.tensor(p + "gate_up_proj", T.FFN_UP_EXP, "expert", bid,
                            transform=lambda w: w[..., 1::2].transpose(1, 2).contiguous()),
                self.tensor(p + "down_proj", T.FFN_DOWN_EXP, "expert", bid,
                            transform=lambda w: w.transpose(1, 2).contiguous()),
            ]
            e, n_in, two_ff = self.reader.shape(p + "gate_up_proj")
            weights[0].shape = weights[1].shape = (e, two_ff // 2, n_in)
            e, ff, n_out = self.reader.shape(p + "down_proj")
            weights[2].shape = (e, n_out, ff)
        else:
            raise CheckpointError(f"layer {bid} has no expert tensors (looked for {p}gate_up_proj and "
                                  f"{p}gate_up_proj_blocks); the checkpoint is incomplete or not GPT-OSS")
        biases = [
            self.tensor(gate_up_b, T.FFN_GATE_EXP, "bias", bid, suffix="bias", transform=lambda b: b[:, 0::2].contiguous()),
            self.tensor(gate_up_b, T.FFN_UP_EXP, "bias", bid, suffix="bias", transform=lambda b: b[:, 1::2].contiguous()),
            self.tensor(down_b, T.FFN_DOWN_EXP, "bias", bid, suffix="bias"),
        ]
        e, two_ff = self.reader.shape(gate_up_b)
        biases[0].shape = biases[1].shape = (e, two_ff // 2)
        return weights + biases

    def _mxfp4_experts(self, bid: int, p: str) -> list[TensorSource]:
        sources = []
        for kind, stem, rows in ((T.FFN_GATE_EXP, "gate_up_proj", slice(0, None, 2)),
                                 (T.FFN_UP_EXP, "gate_up_proj", slice(1, None, 2)),
                                 (T.FFN_DOWN_EXP, "down_proj", slice(None))):
            blocks_name, scales_name = p + stem + "_blocks", p + stem + "_scales"
            for name in (blocks_name, scales_name):
                if not self.reader.has(name):
                    raise CheckpointError(f"tensor {name} is missing from {self.reader.model_dir}; the checkpoint is incomplete")
            e, n_rows, groups, _ = self.reader.shape(blocks_name)
            n_rows = len(range(n_rows)[rows])

            def raw_parts(blocks_name=blocks_name, scales_name=scales_name, rows=rows):
                blocks = self.raw(blocks_name)[:, rows]
                scales = self.raw(scales_name)[:, rows]
                return blocks, scales

            sources.append(TensorSource(
                self.gguf_name(kind, bid), (e, n_rows, groups * 32), "expert",
                lambda raw_parts=raw_parts: mxfp4_dequantize(*raw_parts()), bid, (blocks_name, scales_name),
                raw_qtype=MXFP4, load_raw=lambda raw_parts=raw_parts: mxfp4_to_ggml(*raw_parts())))
        return sources
