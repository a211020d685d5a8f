"""Llama-4 text (Llama4ForCausalLM, and the text part of the hub's Llama4ForConditionalGeneration: Scout,
Maverick) -> llama.cpp arch `llama4`.

Attention: GQA with RoPE on adjacent pairs (as the weights are laid out: no permutation), llama3 RoPE scaling
written as the rope_freqs factors; every 4th layer has no RoPE (NoPE) and scales q by llama.cpp's temperature
log(floor((pos + 1) / 8192) + 1) * 0.1 + 1; the RoPE layers normalise q and k per head by a weightless RMSNorm
after RoPE (use_qk_norm; llama.cpp decides it by the expert count: off for the 128-expert Maverick) and attend
in chunks of 8192 tokens. llama.cpp hard-codes the NoPE step 4, the chunk 8192 and the temperature 8192 / 0.1:
checkpoints with other values are refused.

FFN: every interleave_moe_layer_step-th layer is MoE, the others dense (intermediate_size_mlp). Routing: top-k
of the router logits, weights sigmoid of the chosen logits, not renormalised, multiplied into the experts'
*input* (llama.cpp's weight_before_ffn), outputs summed; one shared expert added unweighted. Experts are fused
on disk, transposed: gate_up_proj [E, n_embd, 2 ff] (gate columns first), down_proj [E, ff, n_embd].
The vision tower and projector of the multimodal checkpoints are left out (llama.cpp's mmproj file).
"""
from __future__ import annotations

import math

import gguf

from moeq2gguf.errors import CheckpointError, Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, ModelSpec, Routing, TensorSource, config_value
from moeq2gguf.models.registry import register

T = gguf.MODEL_TENSOR
NOPE_STEP, CHUNK, TEMPERATURE_FLOOR, TEMPERATURE_SCALE = 4, 8192, 8192, 0.1


def llama3_rope_factors(config_rope: dict, theta: float, n_rot: int) -> tuple[float, ...]:
    """Per rotary frequency, the divisor llama3 scaling applies (1 for high frequencies, `factor` for low ones,
    a smooth blend between), computed in float32 as llama.cpp's converter does."""
    import torch
    freqs = 1.0 / (theta ** (torch.arange(0, n_rot, 2, dtype=torch.float32) / n_rot))
    factor = float(config_rope.get("factor", 8.0))
    low, high = float(config_rope.get("low_freq_factor", 1.0)), float(config_rope.get("high_freq_factor", 4.0))
    old_ctx = float(config_rope.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(torch.tensor(f, dtype=torch.float32)) for f in out)


@register
class Llama4Adapter(FamilyAdapter):
    hf_architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    gguf_arch = gguf.MODEL_ARCH.LLAMA4
    family = "llama4"
    default_pre_tokenizer = "llama4"

    def __init__(self, reader):
        self.prefix = "language_model.model." if reader.has("language_model.model.embed_tokens.weight") else "model."
        self.head = "language_model.lm_head.weight" if self.prefix.startswith("language_model") else "lm_head.weight"
        super().__init__(reader)

    def make_spec(self, config: dict) -> ModelSpec:
        c = {**config, **(config.get("text_config") or {})}
        n_layers = config_value(c, "num_hidden_layers")
        hidden = config_value(c, "hidden_size")
        n_heads = config_value(c, "num_attention_heads")
        head_dim = config_value(c, "head_dim", default=hidden // n_heads)
        n_experts = config_value(c, "num_local_experts")
        step = int(c.get("interleave_moe_layer_step") or 1)
        moe = tuple(i for i in range(n_layers) if (i + 1) % step == 0)
        if c.get("moe_layers") is not None and tuple(c["moe_layers"]) != moe:
            raise Moeq2ggufError(f"moe_layers {c['moe_layers']} is not every {step}th layer: llama.cpp's llama4 graph "
                                 "places the MoE layers by interleave_moe_layer_step only")
        nope = tuple(i for i in range(n_layers) if (i + 1) % NOPE_STEP == 0)
        rope_flags = c.get("no_rope_layers")
        if rope_flags is not None and tuple(i for i, f in enumerate(rope_flags) if not f) != nope:
            raise Moeq2ggufError(f"no_rope_layers does not leave out RoPE in every {NOPE_STEP}th layer exactly, which "
                                 "llama.cpp's llama4 graph hard-codes")
        for key, value in (("attention_chunk_size", CHUNK), ("floor_scale", TEMPERATURE_FLOOR),
                           ("attn_scale", TEMPERATURE_SCALE)):
            if c.get(key) is not None and c[key] != value:
                raise Moeq2ggufError(f"{key}={c[key]}: llama.cpp's llama4 graph hard-codes {value}; the file would run "
                                     "differently from the checkpoint")
        if c.get("attn_temperature_tuning") is False:
            raise Moeq2ggufError("attn_temperature_tuning=false: llama.cpp's llama4 graph always tunes the NoPE "
                                 "layers' temperature")
        if bool(c.get("use_qk_norm", True)) != (n_experts != 128):
            raise Moeq2ggufError(f"use_qk_norm={c.get('use_qk_norm')} with {n_experts} experts: llama.cpp's llama4 graph "
                                 "turns the q/k norm off exactly for 128 experts (Maverick) and on otherwise")
        params = dict(c.get("rope_scaling") or {})
        params.update(c.get("rope_parameters") or {})
        theta = float(params.get("rope_theta", c.get("rope_theta", 500000.0)))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "llama3"):
            raise Moeq2ggufError(f"rope type {kind!r} is not supported for Llama-4; default and llama3 are")
        return ModelSpec(
            family=self.family, hf_architecture=config["architectures"][0], gguf_arch=self.arch_name,
            vocab_size=config_value(c, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=config_value(c, "num_key_value_heads", default=n_heads), head_dim=head_dim,
            context_length=config_value(c, "max_position_embeddings"),
            rms_norm_eps=config_value(c, "rms_norm_eps", default=1e-5), rope_theta=theta,
            n_experts=n_experts, n_experts_used=config_value(c, "num_experts_per_tok"),
            expert_width=config_value(c, "intermediate_size"),
            routing=Routing(scoring="sigmoid", renormalize=False),
            n_shared_experts=1, shared_expert_width=config_value(c, "intermediate_size"),
            dense_width=config_value(c, "intermediate_size_mlp"),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), moe_layers=moe,
            qk_norm="l2" if n_experts != 128 else "", expert_weight_on_input=True, nope_layers=nope,
            rope_freq_factors=llama3_rope_factors(params, theta, head_dim) if kind == "llama3" else None,
            attention_chunk=CHUNK,
        )

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        self.add_common_metadata(writer)
        if s.head_dim * s.n_heads == s.hidden_size:   # llama.cpp's converter writes them when head_dim is given
            writer.add_key_length(s.head_dim)
            writer.add_value_length(s.head_dim)
        writer.add_feed_forward_length(s.dense_width)
        writer.add_expert_feed_forward_length(s.expert_width)
        writer.add_interleave_moe_layer_step(s.moe_layers[0] + 1 if s.moe_layers else s.n_layers + 1)

    def ignored(self, name: str) -> bool:
        return name.startswith(("vision_model.", "multi_modal_projector."))

    def head_tensors(self) -> list[TensorSource]:
        return [self.tensor(self.prefix + "embed_tokens.weight", T.TOKEN_EMBD, "embedding")]

    def tail_tensors(self) -> list[TensorSource]:
        out = [self.tensor(self.prefix + "norm.weight", T.OUTPUT_NORM, "norm")]
        if self.reader.has(self.head):
            out.append(self.tensor(self.head, T.OUTPUT, "output"))
        elif not self.spec.tie_embeddings:
            raise CheckpointError(f"{self.head} is missing and tie_word_embeddings is false; the checkpoint is incomplete")
        if self.spec.rope_freq_factors:
            import torch
            factors = self.spec.rope_freq_factors
            out.append(TensorSource(self.gguf_name(T.ROPE_FREQS), (len(factors),), "norm",
                                    lambda: torch.tensor(factors, dtype=torch.float32)))
        return out

    def check_all_used(self, sources: list[TensorSource]) -> None:
        if self.spec.tie_embeddings and self.reader.has(self.head):
            sources = [*sources, TensorSource("", (), "output", lambda: None, inputs=(self.head,))]
        super().check_all_used(sources)

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        p = f"{self.prefix}layers.{bid}."
        a = p + "self_attn."
        out = [
            self.tensor(p + "input_layernorm.weight", T.ATTN_NORM, "norm", bid),
            self.tensor(a + "q_proj.weight", T.ATTN_Q, "attention", bid),
            self.tensor(a + "k_proj.weight", T.ATTN_K, "attention", bid),
            self.tensor(a + "v_proj.weight", T.ATTN_V, "attention", bid),
            self.tensor(a + "o_proj.weight", T.ATTN_OUT, "attention", bid),
            self.tensor(p + "post_attention_layernorm.weight", T.FFN_NORM, "norm", bid),
        ]
        f = p + "feed_forward."
        if bid not in self.spec.moe_layers:
            return out + self.dense_ffn(bid, f[:-1])
        gate_up, down = f + "experts.gate_up_proj", f + "experts.down_proj"
        for name in (gate_up, down):
            if not self.reader.has(name):
                raise CheckpointError(f"tensor {name} is missing from {self.reader.model_dir}; the checkpoint is incomplete")
        e, n_in, two_ff = self.reader.shape(gate_up)
        ff = two_ff // 2
        return out + [
            self.tensor(f + "router.weight", T.FFN_GATE_INP, "router", bid),
            TensorSource(self.gguf_name(T.FFN_GATE_EXP, bid), (e, ff, n_in), "expert",
                         lambda: self.reader.get(gate_up)[:, :, :ff].transpose(1, 2).contiguous(), bid, (gate_up,)),
            TensorSource(self.gguf_name(T.FFN_UP_EXP, bid), (e, ff, n_in), "expert",
                         lambda: self.reader.get(gate_up)[:, :, ff:].transpose(1, 2).contiguous(), bid, (gate_up,)),
            TensorSource(self.gguf_name(T.FFN_DOWN_EXP, bid), (e, n_in, ff), "expert",
                         lambda: self.reader.get(down).transpose(1, 2).contiguous(), bid, (down,)),
            *self.shared_ffn(bid, f + "shared_expert"),
        ]
