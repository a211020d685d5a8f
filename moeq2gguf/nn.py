"""Float forward of one MoE decoder layer, in GGUF orientation, as llama.cpp computes it.

Weights are the tensors the GGUF will hold (keys are GGUF names without the `blk.N.` prefix, e.g.
`attn_q.weight`, `ffn_gate_exps.weight` [E, ff, n_embd]), so calibration statistics are about the
exact tensors that get quantized. Checked against transformers' hidden states layer by layer.

An observer, when given, receives the input of every quantizable linear, once per distinct input
(INPUT_OF maps each weight to the input it reads):
  observe(input_name, x [T, in], token_weight [T] | None, expert: int | None)
with the routing weight a(t, e) the runtime uses as token_weight for routed experts and the
sigmoid gate for a gated shared expert (ALGORITHMS.md section 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moeq2gguf.models.base import ModelSpec

# llama.cpp rotates adjacent pairs (NORM) for these archs, the two halves of each head (NEOX) otherwise.
NORM_ROPE_ARCHS = ("llama", "deepseek", "deepseek2")


# weight (GGUF name without blk.N. and .weight) -> the input it reads
INPUT_OF = {
    "attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_output",
    "ffn_gate_exps": "exps_in", "ffn_up_exps": "exps_in", "ffn_down_exps": "exps_down",
    "ffn_gate_shexp": "shexp_in", "ffn_up_shexp": "shexp_in", "ffn_down_shexp": "shexp_down",
    "output": "output",
}


def unsupported_reason(spec: ModelSpec) -> str | None:
    """Why this layer math cannot run a family (None when it can): it implements GQA attention with
    optional q/k/v biases, softmax routing and an optionally sigmoid-gated shared expert."""
    if spec.gguf_arch not in ("llama", "qwen2moe"):
        return f"the calibration forward implements Mixtral and Qwen2-MoE layers, not {spec.gguf_arch}"
    return None


class Observer(Protocol):
    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None: ...


@dataclass
class Routing:
    experts: torch.Tensor   # [T, k] selected expert ids
    weights: torch.Tensor   # [T, k] routing weights applied to expert outputs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, neox: bool) -> torch.Tensor:
    """x [B, H, L, D]; rotate pairs (2i, 2i+1) (NORM) or (i, i + D/2) (NEOX) by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = (positions.to(torch.float64)[:, None] * inv_freq[None, :]).to(x.dtype)  # [L, D/2]
    cos, sin = angles.cos(), angles.sin()
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y + bias if bias is not None else y


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None) -> torch.Tensor:
    """x [B, L, n_embd] (already normed) -> [B, L, n_embd]; causal GQA with RoPE."""
    b, L, _ = x.shape
    flat = x.reshape(b * L, -1)
    if observer:
        observer.observe("attn_in", flat, None, None)
    q = linear(flat, w, "attn_q").view(b, L, spec.n_heads, spec.head_dim).transpose(1, 2)
    k = linear(flat, w, "attn_k").view(b, L, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    v = linear(flat, w, "attn_v").view(b, L, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    positions = torch.arange(L, device=x.device)
    neox = spec.gguf_arch not in NORM_ROPE_ARCHS
    q, k = rope(q, positions, spec.rope_theta, neox), rope(k, positions, spec.rope_theta, neox)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(spec.head_dim),
                                         enable_gqa=spec.n_heads != spec.n_kv_heads)
    out = out.transpose(1, 2).reshape(b * L, spec.n_heads * spec.head_dim)
    if observer:
        observer.observe("attn_output", out, None, None)
    return linear(out, w, "attn_output").view(b, L, -1)


def router_logits(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return x @ w["ffn_gate_inp.weight"].T


def route(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec) -> Routing:
    logits = router_logits(x, w)
    r = spec.routing
    probs = torch.softmax(logits, dim=-1) if r.scoring == "softmax" else torch.sigmoid(logits)
    weights, experts = probs.topk(spec.n_experts_used, dim=-1)
    if r.renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    return Routing(experts, weights * r.scale)


def moe(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None,
        routing: Routing | None = None) -> tuple[torch.Tensor, Routing]:
    """x [T, n_embd] (already normed) -> [T, n_embd]. `routing` fixes the expert choice (else computed)."""
    routing = routing or route(x, w, spec)
    out = torch.zeros_like(x)
    gate_w, up_w, down_w = w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"]
    for e in range(spec.n_experts):
        tok, slot = (routing.experts == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, a = x[tok], routing.weights[tok, slot]
        if observer:
            observer.observe("exps_in", xe, a, e)
        h = F.silu(xe @ gate_w[e].T) * (xe @ up_w[e].T)
        if observer:
            observer.observe("exps_down", h, a, e)
        out.index_add_(0, tok, (h @ down_w[e].T) * a[:, None])
    if "ffn_up_shexp.weight" in w:
        gate = torch.sigmoid(x @ w["ffn_gate_inp_shexp.weight"][:, None])[:, 0] if "ffn_gate_inp_shexp.weight" in w else None
        if observer:
            observer.observe("shexp_in", x, gate, None)
        h = F.silu(x @ w["ffn_gate_shexp.weight"].T) * (x @ w["ffn_up_shexp.weight"].T)
        if observer:
            observer.observe("shexp_down", h, gate, None)
        shared = h @ w["ffn_down_shexp.weight"].T
        out = out + (shared * gate[:, None] if gate is not None else shared)
    return out, routing


def decoder_layer(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None = None,
                  routing: Routing | None = None) -> tuple[torch.Tensor, Routing]:
    """One decoder layer: x [B, L, n_embd] -> (x', routing of its B*L tokens)."""
    h = x + attention(rms_norm(x, w["attn_norm.weight"], spec.rms_norm_eps), w, spec, observer)
    normed = rms_norm(h, w["ffn_norm.weight"], spec.rms_norm_eps)
    b, L, d = normed.shape
    y, routing = moe(normed.reshape(b * L, d), w, spec, observer, routing)
    return h + y.view(b, L, d), routing


def embed(tokens: torch.Tensor, token_embd: torch.Tensor) -> torch.Tensor:
    return token_embd[tokens]


def head(x: torch.Tensor, output_norm: torch.Tensor, output: torch.Tensor, spec: ModelSpec,
         observer: Observer | None = None) -> torch.Tensor:
    normed = rms_norm(x, output_norm, spec.rms_norm_eps)
    if observer:
        observer.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
    return normed @ output.T
