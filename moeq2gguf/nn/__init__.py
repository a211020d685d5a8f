"""Float forward of one MoE decoder layer, in GGUF orientation, as llama.cpp computes it.

Weights are the tensors the GGUF will hold (keys are GGUF names without the `blk.N.` prefix, e.g.
`attn_q.weight`, `ffn_gate_exps.weight` [E, ff, n_embd]), so calibration statistics are about the
exact tensors that get quantized. Checked against transformers' layers (tests/test_nn.py) for every
family the adapters convert: Mixtral (llama), Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeekMoE (deepseek),
DeepSeek-V2/V3 (deepseek2), GPT-OSS, GLM-4.5 (glm4moe), MiniMax-M2,
Qwen3.5-MoE (qwen35moe, with its Gated DeltaNet layers in nn.linear_attention) and Llama-4 (llama4). Attention lives in nn.self_attention; the feed-forward half
(dense FFN, routing, routed and shared experts) here.

An observer, when given, receives the input of every quantizable linear, once per distinct input
(INPUT_OF maps each weight to the input it reads):
  observe(input_name, x [T, in], token_weight [T] | None, expert: int | None)
with the routing weight a(t, e) the runtime multiplies expert e's output by as token_weight for
routed experts (None for Llama-4, whose weight scales the expert's input instead: x * a is observed) (after renormalisation and routed scaling where the architecture applies them; for
GPT-OSS the softmax over the chosen k) and the sigmoid gate for a gated shared expert
(docs/METHODS.md section 3). MLA's per-head weight stacks (attn_k_b, attn_v_b) get x [T, H, in]: one
group per head, each seeing every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeq2gguf.models.base import ModelSpec
from moeq2gguf.nn.hadamard import apply_blocks
from moeq2gguf.nn.linear_attention import gated_delta_net
from moeq2gguf.nn.ops import Observer, linear, rms_norm
from moeq2gguf.nn.self_attention import NORM_ROPE_ARCHS, attention, mla_attention, rope, rope_frequencies, rope_mscale

__all__ = ["INPUT_OF", "NORM_ROPE_ARCHS", "Observer", "Routing", "attention", "attention_half", "decoder_layer", "dense_ffn", "embed",
           "gated_delta_net",
           "head", "linear", "mla_attention", "moe", "rms_norm", "rope", "rope_frequencies", "rope_mscale", "route",
           "routed_experts", "router_logits", "select_experts", "selection_scores", "unsupported_reason"]

# weight (GGUF name without blk.N. and .weight) -> the input it reads
INPUT_OF = {
    "attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_output",
    # MLA (deepseek2): attn_q_a and attn_kv_a_mqa read the normed hidden state like attn_q
    "attn_q_a": "attn_in", "attn_kv_a_mqa": "attn_in", "attn_q_b": "q_lora",
    "attn_k_b": "q_nope", "attn_v_b": "attn_latent",
    "ffn_gate": "dense_in", "ffn_up": "dense_in", "ffn_down": "dense_down",
    "ffn_gate_exps": "exps_in", "ffn_up_exps": "exps_in", "ffn_down_exps": "exps_down",
    "ffn_gate_shexp": "shexp_in", "ffn_up_shexp": "shexp_in", "ffn_down_shexp": "shexp_down",
    "output": "output",
    # qwen35moe's Gated DeltaNet layers: four projections of the normed input, and the gated-normed output
    "attn_qkv": "attn_in", "attn_gate": "attn_in", "ssm_alpha": "attn_in", "ssm_beta": "attn_in",
    "ssm_out": "ssm_out_in",
}

SUPPORTED_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "gpt-oss", "glm4moe", "minimax-m2", "qwen35moe", "llama4", "ernie4_5-moe")


def unsupported_reason(spec: ModelSpec) -> str | None:
    """Why this layer math cannot run a model (None when it can): it implements the llama.cpp graphs
    of SUPPORTED_ARCHS with the options their adapters produce."""
    if spec.gguf_arch not in SUPPORTED_ARCHS:
        return f"the calibration forward implements the {', '.join(SUPPORTED_ARCHS)} graphs, not {spec.gguf_arch}"
    if spec.routing.scoring not in ("softmax", "sigmoid", "softmax_topk"):
        return f"expert scoring {spec.routing.scoring!r} is not implemented"
    if spec.expert_activation not in ("silu", "swiglu_oai"):
        return f"expert activation {spec.expert_activation!r} is not implemented"
    if spec.rope_scaling is not None and spec.rope_scaling.kind != "yarn":
        return f"rope scaling {spec.rope_scaling.kind!r} is not implemented"
    if spec.qk_norm not in ("", "head", "full", "l2"):
        return f"q/k norm {spec.qk_norm!r} is not implemented"
    return None


@dataclass
class Routing:
    experts: torch.Tensor   # [T, k] selected expert ids
    weights: torch.Tensor   # [T, k] routing weights applied to expert outputs


def router_logits(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return linear(x, w, "ffn_gate_inp")   # gpt-oss's router has a bias


def route(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec) -> Routing:
    """llama.cpp's build_moe_ffn selection: x [T, n_embd] -> experts and weights [T, k]."""
    return select_experts(router_logits(x, w), spec, w.get("exp_probs_b.bias"))


def select_experts(logits: torch.Tensor, spec: ModelSpec, selection_bias: torch.Tensor | None = None) -> Routing:
    """The family's routing rule on router logits [T, E] (a router bias already added, as GPT-OSS's is):
    experts and weights [T, k]. selection_bias: DeepSeek-V3's exp_probs_b (biases the choice, not the weights).
    EBSS and the balance metric count experts with this same rule (calib/balance.py)."""
    r, k = spec.routing, spec.n_experts_used
    if r.scoring == "softmax_topk":      # gpt-oss: top-k on the logits, softmax over the k chosen
        top, experts = logits.topk(k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        probs, select = selection_scores(logits, spec, selection_bias)
        experts = select.topk(k, dim=-1).indices
        weights = probs.gather(1, experts)
    if r.renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
    return Routing(experts, weights * r.scale)


def selection_scores(logits: torch.Tensor, spec: ModelSpec,
                     selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, the scores the top-k is taken over) [T, E] under the family's rule: softmax or sigmoid,
    plus DeepSeek-V3's selection bias, with the experts of groups that do not compete at -inf. For top-k on raw
    logits (gpt-oss) both are the logits."""
    r = spec.routing
    if r.scoring == "softmax_topk":
        return logits, logits
    probs = torch.softmax(logits, dim=-1) if r.scoring == "softmax" else torch.sigmoid(logits)
    # DeepSeek-V3: exp_probs_b biases the choice of experts, never their weights
    select = probs + selection_bias.to(probs) if selection_bias is not None else probs
    if r.n_groups > 1:   # only the n_groups_used groups with the best two-expert sums compete
        groups = select.view(select.shape[0], r.n_groups, -1)
        group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(r.n_groups_used, dim=-1).indices, True)
        select = groups.masked_fill(~keep[..., None], float("-inf")).view_as(select)
    return probs, select


def _expert_activation(gate: torch.Tensor, up: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.expert_activation == "swiglu_oai":   # ggml_swiglu_oai: gate clamped above, up both ways
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return gate * torch.sigmoid(spec.swiglu_alpha * gate) * (up + 1)
    return F.silu(gate) * up


def routed_experts(x: torch.Tensor, routing: Routing, w: dict[str, torch.Tensor], spec: ModelSpec,
                   observer: Observer | None, experts: range, out: torch.Tensor | None) -> None:
    """The routed experts `experts` on their tokens of x [T, n_embd]: each one's weighted output added into out, or
    with out None only their inputs observed (the grouped statistics pass, passes/quantize.py). An expert stack may
    live on another device than x (a layer too big for the GPU keeps it on the host): one expert moves at a time."""
    gate_w, up_w, down_w = w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"]
    gate_b, up_b, down_b = (w.get(f"ffn_{p}_exps.bias") for p in ("gate", "up", "down"))
    smooth = w.get("ffn_exps_smooth")   # r_e = 1/s_e [E, n_embd]: the patched runtime's per-expert input smoothing
    for e in experts:
        tok, slot = (routing.experts == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, a = x[tok], routing.weights[tok, slot]
        if smooth is not None:
            xe = xe * smooth[e]
        if spec.expert_weight_on_input:   # llama4: the weight scales the expert's input; its output counts once
            xe, a = xe * a[:, None], None
        if observer:
            observer.observe("exps_in", xe, a, e)
        gate, up = xe @ gate_w[e].to(x.device).T, xe @ up_w[e].to(x.device).T
        if gate_b is not None:
            gate, up = gate + gate_b[e], up + up_b[e]
        h = _expert_activation(gate, up, spec)
        if spec.expert_hadamard_block:   # the patched runtime's expert Hadamard (down_exps hold W H)
            h = apply_blocks(h, spec.expert_hadamard_block)
        if observer:
            observer.observe("exps_down", h, a, e)
        if out is None:
            continue
        y = h @ down_w[e].to(x.device).T
        if down_b is not None:
            y = y + down_b[e]
        out.index_add_(0, tok, y * a[:, None] if a is not None else y)


def moe(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None,
        routing: Routing | None = None) -> tuple[torch.Tensor, Routing]:
    """x [T, n_embd] (already normed) -> [T, n_embd]. `routing` fixes the expert choice (else computed)."""
    routing = routing or route(x, w, spec)
    out = torch.zeros_like(x)
    routed_experts(x, routing, w, spec, observer, range(spec.n_experts), out)
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


def dense_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], observer: Observer | None) -> torch.Tensor:
    """A leading dense layer's SwiGLU FFN (DeepSeek's first_k_dense_replace): x [T, n_embd] -> [T, n_embd]."""
    if observer:
        observer.observe("dense_in", x, None, None)
    h = F.silu(x @ w["ffn_gate.weight"].T) * (x @ w["ffn_up.weight"].T)
    if observer:
        observer.observe("dense_down", h, None, None)
    return h @ w["ffn_down.weight"].T


def attention_half(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None = None,
                   bid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer up to its FFN: x [B, L, n_embd] -> (h = x + attention, the FFN's normed input [B*L, n_embd])."""
    normed = rms_norm(x, w["attn_norm.weight"], spec.rms_norm_eps)
    if "ssm_out.weight" in w:   # qwen35moe's linear-attention layers
        h = x + gated_delta_net(normed, w, spec, observer)
    else:
        h = x + attention(normed, w, spec, observer, bid)
    # gpt-oss normalises the FFN input with attn_post_norm (GGUF post_attention_norm)
    ffn_norm = w["ffn_norm.weight"] if "ffn_norm.weight" in w else w["post_attention_norm.weight"]
    normed = rms_norm(h, ffn_norm, spec.rms_norm_eps)
    return h, normed.reshape(-1, normed.shape[-1])


def decoder_layer(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None = None,
                  routing: Routing | None = None, *, bid: int | None = None,
                  ffn_inputs: list | None = None) -> tuple[torch.Tensor, Routing | None]:
    """One decoder layer: x [B, L, n_embd] -> (x', routing of its B*L tokens, None for a dense layer).
    bid: the layer's index, needed by families whose layers differ by index (gpt-oss's sliding window).
    ffn_inputs: a MoE layer appends (its FFN's normed input [B*L, n_embd], routing), for routed_experts later."""
    h, flat = attention_half(x, w, spec, observer, bid)
    if "ffn_gate_inp.weight" in w:
        y, routing = moe(flat, w, spec, observer, routing)
        if ffn_inputs is not None:
            ffn_inputs.append((flat, routing))
    else:
        y, routing = dense_ffn(flat, w, observer), None
    return h + y.view(h.shape), routing


def embed(tokens: torch.Tensor, token_embd: torch.Tensor) -> torch.Tensor:
    return token_embd[tokens]


def head(x: torch.Tensor, output_norm: torch.Tensor, output: torch.Tensor, spec: ModelSpec,
         observer: Observer | None = None) -> torch.Tensor:
    normed = rms_norm(x, output_norm, spec.rms_norm_eps)
    if observer:
        observer.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
    return normed @ output.T
