"""A torch forward of a file for the patched llama.cpp, with its expert transforms applied explicitly:
expert e reads x * r_e (blk.N.ffn_exps_smooth) and its intermediate activation is rotated blockwise by the
orthonormal Hadamard before the down projection, as runtime_patches/ make build_moe_ffn do. For families
without shared experts or expert biases (Mixtral)."""
from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from moeq2gguf import nn
from moeq2gguf.models.base import ModelSpec
from moeq2gguf.transforms.expert_hadamard import apply_blocks


def gguf_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an F32 GGUF file, in torch order."""
    return {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in gguf.GGUFReader(path).tensors}


def patched_moe(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, hadamard_block: int) -> torch.Tensor:
    assert not any("shexp" in k or k.endswith("_exps.bias") for k in w), "shared experts / expert biases: not covered"
    routing = nn.route(x, w, spec)
    out = torch.zeros_like(x)
    smooth = w.get("ffn_exps_smooth")
    for e in range(spec.n_experts):
        tok, slot = (routing.experts == e).nonzero(as_tuple=True)
        xe = x[tok] if smooth is None else x[tok] * smooth[e]
        h = F.silu(xe @ w["ffn_gate_exps.weight"][e].T) * (xe @ w["ffn_up_exps.weight"][e].T)
        if hadamard_block:
            h = apply_blocks(h, hadamard_block)
        out.index_add_(0, tok, (h @ w["ffn_down_exps.weight"][e].T) * routing.weights[tok, slot][:, None])
    return out


def patched_logits(tensors: dict[str, torch.Tensor], spec: ModelSpec, tokens: list[int],
                   hadamard_block: int) -> np.ndarray:
    eps = spec.rms_norm_eps
    x = nn.embed(torch.tensor([tokens]), tensors["token_embd.weight"])
    with torch.no_grad():
        for bid in range(spec.n_layers):
            prefix = f"blk.{bid}."
            w = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            h = x + nn.attention(nn.rms_norm(x, w["attn_norm.weight"], eps), w, spec, None)
            normed = nn.rms_norm(h, w["ffn_norm.weight"], eps)
            x = h + patched_moe(normed.reshape(-1, normed.shape[-1]), w, spec, hadamard_block).view_as(h)
        return nn.head(x, tensors["output_norm.weight"], tensors["output.weight"], spec)[0].numpy()
