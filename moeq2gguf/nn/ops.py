"""Small pieces shared by the attention and feed-forward halves of the calibration forward."""
from __future__ import annotations

from typing import Protocol

import torch


class Observer(Protocol):
    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        """x [T, in] (one group, or routed expert `expert`), or [T, G, in] with expert None: G groups
        that each see every token (a per-head weight stack such as MLA's attn_k_b / attn_v_b)."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    y = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return y + bias if bias is not None else y
