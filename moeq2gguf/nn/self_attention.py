"""Self-attention of one decoder layer as llama.cpp's graphs compute it (src/models/*.cpp, build_attn).

Shapes:
- llama-style (llama, qwen2moe, qwen3moe, olmoe, deepseek, gpt-oss, glm4moe): q/k/v projections with
  optional biases, optional q/k RMSNorm (per head for qwen3moe and glm4moe, over the whole projection for
  olmoe), RoPE (partial for glm4moe, minimax-m2 and qwen35moe: the first rope_dim dimensions of each head),
  qwen35moe's output gate (attn_q gives [q | gate] per head; the output is multiplied by sigmoid(gate)),
  llama4's NoPE layers (temperature-scaled q), weightless q/k norm after RoPE and chunked attention,
  causal GQA, optionally a sliding window and learned sink logits (gpt-oss), output projection with
  an optional bias;
- Gated DeltaNet linear attention (qwen35moe's other layers) lives in nn.linear_attention;
- MLA (deepseek2) in the absorbed form llama.cpp runs: queries are moved into the kv latent space by
  attn_k_b, attention is MQA over the normalised latent (+ one shared rotary key), and attn_v_b maps
  each head's latent output to its values. Calibration then sees every quantized tensor's runtime
  input, including the per-head inputs of attn_k_b [H, kv_lora, nope] and attn_v_b [H, v, kv_lora].
RoPE, YaRN included, follows llama_context (yarn_attn_factor) and ggml's rope_yarn, not transformers:
the correction range is rounded to whole dimensions and DeepSeek-V2's mscale is llama.cpp's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeq2gguf.models.base import ModelSpec
from moeq2gguf.nn.ops import Observer, linear, rms_norm

# llama.cpp rotates adjacent pairs (NORM) for these archs, the two halves of each head (NEOX) otherwise.
NORM_ROPE_ARCHS = ("llama", "deepseek", "deepseek2", "llama4", "ernie4_5-moe")


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_log_mul(spec: ModelSpec) -> float:
    """rope.scaling.yarn_log_multiplier as llama.cpp uses it: only deepseek2 reads it (and undoes the
    0.1 the file carries); every other graph runs as if it were 0."""
    return spec.rope_scaling.log_mul if spec.gguf_arch == "deepseek2" and spec.rope_scaling else 0.0


def rope_mscale(spec: ModelSpec) -> float:
    """The factor llama.cpp puts on cos and sin: yarn_attn_factor (llama_context) times rope_yarn's
    own 1 + 0.1 ln(factor), which the context divides out beforehand. 1 without YaRN."""
    s = spec.rope_scaling
    if s is None:
        return 1.0
    log_mul = _yarn_log_mul(spec)
    if log_mul:
        mscale = log_mul if spec.gguf_arch == "deepseek2" and log_mul != 1 else 1.0
        return _yarn_mscale(s.factor, mscale) / _yarn_mscale(s.factor, log_mul)
    return _yarn_mscale(s.factor, 1.0)


def rope_frequencies(spec: ModelSpec, n_rot: int) -> torch.Tensor:
    """Inverse frequencies [n_rot/2] (float64): theta^(-2i/n_rot), divided by the rope_freqs factors where the
    file has them (llama3 scaling), with YaRN blending each toward freq/factor outside
    ggml_rope_yarn_corr_dims' (floored, ceiled) range of dimensions."""
    inv_freq = spec.rope_theta ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    if spec.rope_freq_factors:
        inv_freq = inv_freq / torch.tensor(spec.rope_freq_factors, dtype=torch.float64)
    s = spec.rope_scaling
    if s is None:
        return inv_freq

    def corr_dim(rotations: float) -> float:
        return n_rot * math.log(s.original_context_length / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low = max(0.0, math.floor(corr_dim(s.beta_fast)))
    high = min(n_rot - 1.0, math.ceil(corr_dim(s.beta_slow)))
    pair = torch.arange(n_rot // 2, dtype=torch.float64)
    keep = 1 - ((pair - low) / max(0.001, high - low)).clamp(0, 1)   # 1: extrapolate (original frequency)
    return inv_freq * (keep + (1 - keep) / s.factor)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float, neox: bool) -> torch.Tensor:
    """x [B, H, L, D]; rotate pairs (2i, 2i+1) (NORM) or (i, i + D/2) (NEOX) by pos * inv_freq[i],
    cos and sin scaled by mscale."""
    d = x.shape[-1]
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]   # [L, D/2]
    cos, sin = (angles.cos() * mscale).to(x.dtype), (angles.sin() * mscale).to(x.dtype)
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
           sinks: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal: q [B, H, L, Dk], k [B, Hkv, L, Dk], v [B, Hkv, L, Dv] with
    H a multiple of Hkv (head h reads kv head h // (H / Hkv)). window > 0: a query at position i sees
    keys i - window < j <= i (llama.cpp's standard SWA). sinks [H]: a learned logit per head that joins
    every softmax and adds nothing to the output (gpt-oss); it is run as one extra key with k = v = 0
    and the sink as its additive mask, so the fused attention kernels still apply. chunk > 0: a query sees
    the keys of its own chunk of that many tokens only (llama4's chunked attention)."""
    gqa = q.shape[1] != k.shape[1]
    L = q.shape[2]
    if chunk >= L:
        chunk = 0
    if not window and sinks is None and not chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    pos = torch.arange(L, device=q.device)
    dist = pos[:, None] - pos[None, :]
    allowed = (dist >= 0) & (dist < window) if window else dist >= 0
    if chunk:
        allowed &= (pos[:, None] // chunk) == (pos[None, :] // chunk)
    mask = torch.zeros(L, L, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        h = q.shape[1]
        mask = torch.cat([mask.expand(h, L, L), sinks.to(q.dtype).view(h, 1, 1).expand(h, L, 1)], dim=-1)
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None,
              bid: int | None = None) -> torch.Tensor:
    """x [B, L, n_embd] (already normed) -> [B, L, n_embd]. bid: the layer's index, which decides
    whether it slides (gpt-oss); required when spec has sliding-window layers."""
    if spec.mla is not None:
        return mla_attention(x, w, spec, observer)
    b, L, _ = x.shape
    flat = x.reshape(b * L, -1)
    if observer:
        observer.observe("attn_in", flat, None, None)
    q, k, v = linear(flat, w, "attn_q"), linear(flat, w, "attn_k"), linear(flat, w, "attn_v")
    gate = None
    if spec.attn_output_gate:   # qwen35moe: attn_q gives [q | gate] per head
        q, gate = q.view(b * L, spec.n_heads, 2, spec.head_dim).unbind(2)
        gate = gate.reshape(b * L, spec.n_heads * spec.head_dim)
    if spec.qk_norm == "full":   # olmoe: over the whole projection, before the head split
        q = rms_norm(q, w["attn_q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], spec.rms_norm_eps)
    q = q.view(b, L, spec.n_heads, spec.head_dim).transpose(1, 2)
    k = k.view(b, L, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    v = v.view(b, L, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
    if spec.qk_norm == "head":   # qwen3moe: each head by itself
        q = rms_norm(q, w["attn_q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], spec.rms_norm_eps)
    positions = torch.arange(L, device=x.device)
    n_rot = spec.rope_dim or spec.head_dim
    inv_freq, mscale = rope_frequencies(spec, n_rot), rope_mscale(spec)
    neox = spec.gguf_arch not in NORM_ROPE_ARCHS
    nope = bid in spec.nope_layers
    if spec.nope_layers and bid is None:
        raise ValueError(f"{spec.family} has layers without RoPE: pass the layer index (bid)")
    if nope:   # llama4: no RoPE; q scaled by llama.cpp's temperature (1 below 8191 tokens)
        q = q * (torch.log(torch.floor((positions.to(q.dtype) + 1) / 8192) + 1) * 0.1 + 1)[:, None]
    elif n_rot < spec.head_dim:   # partial RoPE: the first n_rot dimensions of a head rotate, the rest pass
        q = torch.cat([rope(q[..., :n_rot], positions, inv_freq, mscale, neox), q[..., n_rot:]], dim=-1)
        k = torch.cat([rope(k[..., :n_rot], positions, inv_freq, mscale, neox), k[..., n_rot:]], dim=-1)
    else:
        q, k = rope(q, positions, inv_freq, mscale, neox), rope(k, positions, inv_freq, mscale, neox)
    if spec.qk_norm == "l2" and not nope:   # llama4: weightless RMSNorm per head, after RoPE
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    chunk = spec.attention_chunk if not nope else 0   # llama4's RoPE layers attend within chunks of tokens
    window = 0
    if spec.swa_layers:
        if bid is None:
            raise ValueError(f"{spec.family} has sliding-window layers: pass the layer index (bid)")
        window = spec.sliding_window if bid in spec.swa_layers else 0
    out = attend(q, k, v, 1 / math.sqrt(spec.head_dim), window, w.get("attn_sinks.weight"), chunk)
    out = out.transpose(1, 2).reshape(b * L, spec.n_heads * spec.head_dim)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    if observer:
        observer.observe("attn_output", out, None, None)
    return linear(out, w, "attn_output").view(b, L, -1)


def mla_attention(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None) -> torch.Tensor:
    """DeepSeek-V2/V3 multi-head latent attention, absorbed (llama.cpp deepseek2 with MLA tensors).
    x [B, L, n_embd] (already normed) -> [B, L, n_embd]."""
    mla, eps = spec.mla, spec.rms_norm_eps
    b, L, _ = x.shape
    n_head, nope, n_rot, kv_lora = spec.n_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    flat = x.reshape(b * L, -1)
    if observer:
        observer.observe("attn_in", flat, None, None)
    if "attn_q_a.weight" in w:   # q LoRA: attn_q_a -> RMSNorm -> attn_q_b
        q_lora = rms_norm(linear(flat, w, "attn_q_a"), w["attn_q_a_norm.weight"], eps)
        if observer:
            observer.observe("q_lora", q_lora, None, None)
        q = linear(q_lora, w, "attn_q_b")
    else:                        # lite layout
        q = linear(flat, w, "attn_q")
    q = q.view(b * L, n_head, nope + n_rot)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    kv_pe = linear(flat, w, "attn_kv_a_mqa")                      # [T, kv_lora + rope]
    kv = rms_norm(kv_pe[:, :kv_lora], w["attn_kv_a_norm.weight"], eps)
    k_pe = kv_pe[:, kv_lora:]

    if observer:
        observer.observe("q_nope", q_nope, None, None)
    q_absorbed = torch.einsum("thn,hcn->thc", q_nope, w["attn_k_b.weight"])   # attn_k_b [H, kv_lora, nope]

    positions = torch.arange(L, device=x.device)
    inv_freq, mscale = rope_frequencies(spec, n_rot), rope_mscale(spec)
    q_pe = rope(q_pe.view(b, L, n_head, n_rot).transpose(1, 2), positions, inv_freq, mscale, neox=False)
    k_pe = rope(k_pe.view(b, 1, L, n_rot), positions, inv_freq, mscale, neox=False)
    # deepseek2.cpp: kq_scale = mscale^2 / sqrt(nope + rope), mscale from the rope's and yarn_log_mul. With
    # YaRN but no mscale_all_dim (no released checkpoint) llama.cpp still squares the rope's factor into
    # kq_scale where transformers does not; this follows llama.cpp, which is what will run the file.
    kq_mscale = mscale
    if spec.rope_scaling is not None:
        kq_mscale *= 1 + 0.1 * _yarn_log_mul(spec) * math.log(spec.rope_scaling.factor)
    scale = kq_mscale * kq_mscale / math.sqrt(nope + n_rot)

    query = torch.cat([q_absorbed.view(b, L, n_head, kv_lora).transpose(1, 2), q_pe], dim=-1)  # [B, H, L, kv_lora + rope]
    latent = kv.view(b, 1, L, kv_lora)
    key = torch.cat([latent, k_pe], dim=-1)                                                    # [B, 1, L, kv_lora + rope]
    out = attend(query, key, latent, scale)                                                    # [B, H, L, kv_lora]
    out = out.transpose(1, 2).reshape(b * L, n_head, kv_lora)
    if observer:
        observer.observe("attn_latent", out, None, None)
    values = torch.einsum("thc,hvc->thv", out, w["attn_v_b.weight"])        # attn_v_b [H, v, kv_lora]
    values = values.reshape(b * L, n_head * mla.v_head_dim)
    if observer:
        observer.observe("attn_output", values, None, None)
    return linear(values, w, "attn_output").view(b, L, -1)
