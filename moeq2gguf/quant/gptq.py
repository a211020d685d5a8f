"""GPTQ into a fixed GGML grid, batched over experts (docs/METHODS.md section 2).

Frantar et al., "GPTQ" (2022): walk the input columns in order, quantize column j, spread its error
onto the columns not yet quantized through the upper Cholesky factor of H^-1, in lazy blocks.
Adaptation to GGML block formats: when the walk reaches the first column of a format block, that
block's scales (and mins) are fitted from the current, error-updated weights with the format's own
search and frozen; columns are then rounded to the nearest value of that frozen grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Grid(Protocol):
    """A format's grid for GPTQ: `group` columns share one set of scales."""
    group: int

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> Any:
        """Frozen scales for the block w [R, group], importance [R, group] (one row per weight row)."""

    def round(self, column: torch.Tensor, params: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid values [R], their codes [R]) for column j (0 <= j < group) of the block fitted as params.
        The codes are what gets packed: a grid value need not map back to the same code."""


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01            # fraction of mean(diag H) added to the diagonal
    lazy_block: int = 256         # columns per lazy update; a multiple of every format block (32, 256)
    keep_rounded: bool = False    # keep each weight as the walk rounded it, for --refine (quant/refine.py)

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp {self.damp} must be in [0, 1)")
        if self.lazy_block % 256:
            raise ValueError(f"lazy_block {self.lazy_block} must be a multiple of 256 (the K-quant super-block)")


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, batched: H [G, K, K] -> [G, K, K].
    Columns that never saw a non-zero input (diag 0) get a unit diagonal so they round to nearest.
    A few experts at a time, so that the float64 temporaries stay near FACTOR_CHUNK_BYTES (each matrix is factored
    on its own either way: the result does not depend on the chunking)."""
    K = H.shape[-1]
    step = max(1, FACTOR_CHUNK_BYTES // (8 * K * K))
    if H.shape[0] > step:
        return torch.cat([inverse_hessian_factor(H[g:g + step], damp) for g in range(0, H.shape[0], step)])
    H = H.to(torch.float64).clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    L = torch.linalg.cholesky(H)
    del H
    Hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)


FACTOR_CHUNK_BYTES = 1 << 30


def group_weights(U_block: torch.Tensor) -> torch.Tensor:
    """[G, v, v] upper block of the inverse-Hessian factor -> [G, v]: the diagonal of U^-1 U^-T, the weights of a jointly
    chosen group's squared errors in GPTQ's loss (its off-diagonal coupling is left out of the search)."""
    eye = torch.eye(U_block.shape[-1], dtype=U_block.dtype, device=U_block.device).expand_as(U_block)
    inv = torch.linalg.solve_triangular(U_block, eye, upper=True)
    return (inv * inv).sum(-1)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, cfg: GPTQConfig = GPTQConfig(),
                  targets: torch.Tensor | None = None, U: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """W [G, R, K] weights of G experts (G = 1 for a dense matrix), H [G, K, K] their Hessians.

    Returns the quantized weights Q [G, R, K] (the values the runtime will compute), their codes
    [G, R, K] and the fitted params of each block, in column order (params[b] covers columns
    b*group .. (b+1)*group-1 for all G*R rows). targets [G, R, K], when given, receives each weight as the walk
    rounded it (after the error feedback of the columns before it): what --refine rounds again (quant/refine.py).
    U: inverse_hessian_factor(H, cfg.damp) when the caller has it (tensors reading the same input share it).

    Each lazy block is walked column-major ([B, G, R]: a column of all G*R rows is contiguous), so the per-column
    operations read and write contiguous memory; the arithmetic is the same, element for element, as walking
    [G, R, B] (tests/quant/test_gptq.py), and faster (BENCHMARKS.md, conversion at real shapes)."""
    G, R, K = W.shape
    if K % grid.group:
        raise ValueError(f"row size {K} is not a multiple of the format block {grid.group}")
    if U is None:
        U = inverse_hessian_factor(H, cfg.damp)                 # [G, K, K]
    importance = H.diagonal(dim1=-2, dim2=-1).to(torch.float32)  # [G, K]
    W = W.to(torch.float32).clone()
    Q = torch.empty_like(W)
    codes = torch.empty(W.shape, dtype=torch.int32, device=W.device)   # on W's device: no per-column host copy
    params: list[Any] = []
    B = min(cfg.lazy_block, K)
    inner = min(32, grid.group, B)  # errors spread eagerly only inside 32 columns; matmuls do the rest
    vector = getattr(grid, "vector", 1)   # columns a lattice chooses jointly (quant/lattice_grid.py)
    chosen = None
    rows = lambda t: t.permute(1, 2, 0)   # noqa: E731  [n, G, R] -> [G, R, n], a view
    for b0 in range(0, K, B):
        b1 = min(b0 + B, K)
        n = b1 - b0
        W1 = W[:, :, b0:b1].permute(2, 0, 1).contiguous()   # [n, G, R]
        Err = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        C1 = torch.empty(W1.shape, dtype=torch.int32, device=W.device)
        T1 = torch.empty_like(W1) if targets is not None else None
        U1 = U[:, b0:b1, b0:b1]
        for i0 in range(0, n, inner):
            i1 = min(i0 + inner, n)
            for j in range(i0, i1):
                col = b0 + j
                jj = col % grid.group
                if jj == 0:  # every column of this block is up to date here: fit and freeze its scales
                    block = rows(W1[j:j + grid.group]).reshape(G * R, grid.group)
                    imp = importance[:, None, col:col + grid.group].expand(G, R, grid.group).reshape(G * R, grid.group)
                    params.append(grid.fit(block, imp))
                w = W1[j]
                if T1 is not None:
                    T1[j] = w
                if vector > 1:
                    if jj % vector == 0:   # the whole group at once, under its diagonal GPTQ weights
                        weights = group_weights(U1[:, j:j + vector, j:j + vector])[:, None, :].expand(G, R, vector)
                        chosen = grid.round_group(rows(W1[j:j + vector]).reshape(G * R, vector),
                                                  weights.reshape(G * R, vector), params[-1], jj).view(G, R, vector)
                    q = chosen[:, :, jj % vector]
                    C1[j] = 0      # the lattice keeps its codes in its params
                else:
                    q, c = grid.round(w.reshape(G * R), params[-1], jj)
                    q = q.view(G, R)
                    C1[j] = c.view(G, R)
                Q1[j] = q
                err = (w - q) / U1[:, j, j][:, None]
                W1[j + 1:i1] -= err[None] * U1[:, j, j + 1:i1].T[:, :, None]
                Err[j] = err
            if i1 < n:
                W1[i1:] -= (rows(Err[i0:i1]) @ U1[:, i0:i1, i1:]).permute(2, 0, 1)
        Q[:, :, b0:b1] = rows(Q1)
        codes[:, :, b0:b1] = rows(C1)
        if targets is not None:
            targets[:, :, b0:b1] = rows(T1)
        if b1 < K:
            W[:, :, b1:] -= rows(Err) @ U[:, b0:b1, b1:]
    return Q, codes.cpu(), params
