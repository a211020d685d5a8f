"""Gated DeltaNet linear attention (Qwen3.5 / Qwen3-Next), as llama.cpp's qwen35moe graph computes it, in GGUF
orientation and head order (value heads tiled over key heads: value head h reads key head h % n_k).

Per token t and value head h, with a state S [head_k_dim, head_v_dim] starting at zero:
  qkv = silu(causal depthwise conv_K(x W_qkv))      -> q, k [n_k, d_k], v [n_v, d_v]
  q, k L2-normalised (eps = rms_norm_eps, as llama.cpp), q scaled by 1/sqrt(d_k)
  decay g = ssm_a * softplus(x W_alpha + ssm_dt)    (ssm_a = -exp(A_log) < 0), beta = sigmoid(x W_beta)
  S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q
  out = (RMSNorm(o) * ssm_norm) * silu(x W_gate), per head, then ssm_out.
The recurrence runs in chunks of C tokens (the WY form of the delta rule: within a chunk a unit lower-triangular
solve turns the C sequential rank-1 updates into matrix products), which equals the token loop in exact
arithmetic; tests/test_nn.py compares both with transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq2gguf.models.base import ModelSpec
from moeq2gguf.nn.ops import Observer, linear, rms_norm

CHUNK = 64


def _l2_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x [B, L, C], kernel [C, K]: out[t, c] = sum_j kernel[c, j] x[t - K + 1 + j, c], zeros before the start."""
    k = kernel.shape[1]
    padded = F.pad(x.transpose(1, 2), (k - 1, 0))
    return F.conv1d(padded, kernel.unsqueeze(1), groups=kernel.shape[0]).transpose(1, 2)


def delta_rule_loop(q, k, v, g, beta):
    """The recurrence token by token. q, k [B, H, L, Dk]; v [B, H, L, Dv]; g, beta [B, H, L] -> [B, H, L, Dv]."""
    b, h, L, dk = k.shape
    state = q.new_zeros(b, h, dk, v.shape[-1])
    out = []
    for t in range(L):
        state = state * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]
        delta = (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", kt, state)) * beta[:, :, t, None]
        state = state + kt[..., None] * delta[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(out, dim=2)


def delta_rule_chunked(q, k, v, g, beta, chunk: int = CHUNK):
    """The same recurrence, C tokens at a time. Within a chunk, with G_i the cumulative log decay up to token i,
    the updates u_i = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} exp(G_i - G_j) (k_i . k_j) u_j) solve a unit
    lower-triangular system; outputs o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) u_j; the
    state carries over as exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T."""
    b, h, L, dk = k.shape
    dv = v.shape[-1]
    pad = (-L) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = q.shape[2] // chunk
    q, k, v = (t.reshape(b, h, n, chunk, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(b, h, n, chunk) for t in (g, beta))
    cum = g.cumsum(-1)                                                      # G_i
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()   # exp(G_i - G_j), j <= i
    kk = (k @ k.transpose(-1, -2)) * decay
    qk = (q @ k.transpose(-1, -2)) * decay
    # (I + diag(beta) strictly_lower(kk)) u = diag(beta) (v - exp(G) k S0): solve for u (and for the S0 term)
    system = torch.eye(chunk, device=q.device, dtype=q.dtype) + beta[..., None] * kk.tril(-1)
    u_v = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    u_k = torch.linalg.solve_triangular(system, beta[..., None] * k * cum.exp()[..., None], upper=False,
                                        unitriangular=True)
    state = q.new_zeros(b, h, dk, dv)
    out = torch.empty_like(v)
    tail = (cum[..., -1:] - cum).exp()                                      # exp(G_C - G_j)
    for c in range(n):
        u = u_v[:, :, c] - u_k[:, :, c] @ state
        out[:, :, c] = (q[:, :, c] * cum[:, :, c].exp()[..., None]) @ state + qk[:, :, c] @ u
        state = state * cum[:, :, c, -1].exp()[..., None, None] + (k[:, :, c] * tail[:, :, c, :, None]).transpose(-1, -2) @ u
    return out.reshape(b, h, n * chunk, dv)[:, :, :L]


def gated_delta_net(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: Observer | None,
                    loop: bool = False) -> torch.Tensor:
    """x [B, L, n_embd] (already normed) -> [B, L, n_embd]. loop: the token-by-token recurrence (a reference)."""
    lin, eps = spec.linear_attention, spec.rms_norm_eps
    b, L, _ = x.shape
    flat = x.reshape(b * L, -1)
    if observer:
        observer.observe("attn_in", flat, None, None)
    qkv = F.silu(causal_conv(linear(flat, w, "attn_qkv").view(b, L, -1), w["ssm_conv1d.weight"]))
    q = qkv[..., :lin.key_dim].reshape(b, L, lin.n_k_heads, lin.head_k_dim)
    k = qkv[..., lin.key_dim:2 * lin.key_dim].reshape(b, L, lin.n_k_heads, lin.head_k_dim)
    v = qkv[..., 2 * lin.key_dim:].reshape(b, L, lin.n_v_heads, lin.head_v_dim)
    per_k = lin.n_v_heads // lin.n_k_heads
    q = _l2_normalise(q, eps).repeat(1, 1, per_k, 1) / lin.head_k_dim ** 0.5    # tiled: value head h <- key head h % n_k
    k = _l2_normalise(k, eps).repeat(1, 1, per_k, 1)
    beta = torch.sigmoid(linear(flat, w, "ssm_beta")).view(b, L, -1)
    g = (F.softplus(linear(flat, w, "ssm_alpha") + w["ssm_dt.bias"]) * w["ssm_a"]).view(b, L, -1)
    heads = [t.transpose(1, 2) for t in (q, k, v)]                          # [B, H, L, D]
    rule = delta_rule_loop if loop else delta_rule_chunked
    o = rule(*heads, g.transpose(1, 2), beta.transpose(1, 2)).transpose(1, 2)   # [B, L, H, Dv]
    z = linear(flat, w, "attn_gate").view(b, L, lin.n_v_heads, lin.head_v_dim)
    o = rms_norm(o, w["ssm_norm.weight"], eps) * F.silu(z)
    o = o.reshape(b * L, lin.value_dim)
    if observer:
        observer.observe("ssm_out_in", o, None, None)
    return linear(o, w, "ssm_out").view(b, L, -1)
