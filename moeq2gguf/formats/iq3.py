"""IQ3_XXS (3.06 bits per weight) and IQ3_S (3.44): ports of ggml's quantizers, byte for byte.

A 256-weight super-block is an fp16 d (stored times 1.0125, ggml's fudge factor) and eight 32-weight sub-blocks;
each sub-block is eight groups of 4 weights, one grid index per group (a 256-point grid of 4 coordinates with 8
levels each: 2l+1 in the search, 4, 12, ..., 52, 62 in the runtime's table), and one 32-bit word of 4 x 7 sign bits
(parity as in IQ2_XXS: sign groups are 8 weights, two grid groups) with a 4-bit scale ls. Weight value:
d (0.5 + ls) / 2 * grid * sign.

The search differs from IQ2_XS in: weights x^2 without an importance vector (ggml allows that here), sigma2 =
2 mean(x^2), a sub-block below 1e-8 counts as zero, the first scale max / 15, 31 candidates (15 + 0.2 is) / max with
is = -15..15, and the off-grid groups of the winner re-rounded once more.

IQ3_S (quantize_row_iq3_s_impl with 32-weight blocks): a 512-point grid (levels 1, 3, ..., 15; 9-bit indices, the
high bits in qh), all 8 signs stored (no parity trick), fudge factor 1.033, 19 candidates (15 + 0.2 is) / max with
is = -9..9, and after the search *every* group re-rounded at the winning scale (ggml's `continue` is commented out).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from moeq2gguf.formats.iq2 import _best_neighbour
from moeq2gguf.formats.iq_grids import lattice_tables
from moeq2gguf.formats.numerics import F32, ZERO, f32_to_f16_bits, nearest_int

QK_K = 256
BLOCK_BYTES = 98
GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)


@njit(cache=True, error_model="numpy")
def _levels4(xval, k, inv, L):
    u = 0
    for i in range(4):
        l = nearest_int(F32(0.5) * (inv * xval[4 * k + i] - F32(1.0)))
        l = max(0, min(7, l))
        L[4 * k + i] = l
        u |= l << (3 * i)
    return u


@njit(cache=True, error_model="numpy")
def _quantize_row(x, qw, weighted, grid, kmap, neighbours, out):
    nbl = x.shape[0] // QK_K
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int64)
    Laux = np.zeros(32, dtype=np.int64)
    on_grid = np.ones(8, dtype=np.bool_)
    on_grid_aux = np.ones(8, dtype=np.bool_)
    scales = np.empty(8, dtype=np.float32)
    signs = np.zeros(4, dtype=np.int64)
    q3 = np.zeros(64, dtype=np.int64)
    words = np.zeros(8, dtype=np.int64)
    for ibl in range(nbl):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        q3[:] = 0
        words[:] = 0
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = F32(2.0) * sumx2 / F32(QK_K)
        for ib in range(8):
            xb = xbl[32 * ib:32 * ib + 32]
            for i in range(32):
                if weighted:
                    weight[i] = qw[QK_K * ibl + 32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = xb[i] * xb[i]
            for i in range(32):
                waux[i] = np.sqrt(weight[i])
            for k in range(4):
                nflip = 0
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= ZERO:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        nflip += 1
                        s |= 1 << i
                if nflip % 2:
                    imin = 0
                    mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
                    for i in range(1, 8):
                        ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                        if ax < mn:
                            mn = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    s ^= 1 << imin
                signs[k] = s & 127
            mx = xval[0]
            for i in range(1, 32):
                mx = max(mx, xval[i])
            L[:] = 0
            if mx < GROUP_MAX_EPS_IQ3_XXS:
                scales[ib] = ZERO
                continue
            best = ZERO
            scale = mx / F32(15.0)
            on_grid[:] = True
            for is_ in range(-15, 16):
                inv = (F32(15.0) + F32(is_) * F32(0.2)) / mx
                this_scale = F32(1.0) / inv
                for k in range(8):
                    u = _levels4(xval, k, inv, Laux)
                    on_grid_aux[k] = True
                    if kmap[u] < 0:
                        on_grid_aux[k] = False
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, this_scale, Laux, 4 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(32):
                    q = F32(2 * Laux[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_grid_aux
            n_off = 0
            for k in range(8):
                if not on_grid[k]:
                    n_off += 1
            if n_off > 0 and scale > ZERO:
                inv = F32(1.0) / scale
                for k in range(8):
                    if on_grid[k]:
                        continue
                    u = _levels4(xval, k, inv, L)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, scale, L, 4 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(32):
                    q = F32(2 * L[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO:
                    scale = sumqx / sumq2
            if scale < ZERO:
                scale = -scale
                for k in range(4):
                    signs[k] = (~signs[k]) & 127
            for k in range(8):
                u = 0
                for i in range(4):
                    u |= L[4 * k + i] << (3 * i)
                g = kmap[u]
                if g < 0:
                    raise ValueError("IQ3_XXS: a group off the grid after the search")
                q3[8 * ib + k] = g
            words[ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        o = ibl * BLOCK_BYTES
        if max_scale == ZERO:
            out[o:o + BLOCK_BYTES] = 0
            continue
        d = max_scale / F32(31.0)
        bits = f32_to_f16_bits(d * F32(1.0125))
        out[o] = bits & 255
        out[o + 1] = (bits >> 8) & 255
        inv = F32(1.0) / d
        for ib in range(8):
            l = nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))
            l = max(0, min(15, l))
            words[ib] |= l << 28
        for j in range(64):
            out[o + 2 + j] = q3[j]
        for ib in range(8):
            for b in range(4):
                out[o + 66 + 4 * ib + b] = (words[ib] >> (8 * b)) & 255


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, qw, weighted, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, weighted, grid, kmap, neighbours, out[r])


def quantize_iq3_xxs(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 or None (weights x^2, as ggml) ->
    (R, C / 256 * 98) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ3_XXS, ...) writes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"IQ3_XXS rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    weighted = importance is not None
    qw = np.ascontiguousarray(importance if weighted else np.zeros(rows.shape[1]), dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    grid, kmap, neighbours = lattice_tables("IQ3_XXS")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows(rows, qw, weighted, grid, kmap, neighbours, out)
    return out


S_BLOCK_BYTES = 110


@njit(cache=True, error_model="numpy")
def _quantize_row_s(x, qw, weighted, grid, kmap, neighbours, out):
    nbl = x.shape[0] // QK_K
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int64)
    Laux = np.zeros(32, dtype=np.int64)
    on_grid = np.zeros(8, dtype=np.bool_)
    on_grid_aux = np.zeros(8, dtype=np.bool_)
    scales = np.empty(8, dtype=np.float32)
    signs = np.zeros(4, dtype=np.int64)
    for ibl in range(nbl):
        o = ibl * S_BLOCK_BYTES
        out[o:o + S_BLOCK_BYTES] = 0
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = F32(2.0) * sumx2 / F32(QK_K)
        for ib in range(8):
            xb = xbl[32 * ib:32 * ib + 32]
            for i in range(32):
                if weighted:
                    weight[i] = qw[QK_K * ibl + 32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = xb[i] * xb[i]
            for i in range(32):
                waux[i] = np.sqrt(weight[i])
            for k in range(4):
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= ZERO:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        s |= 1 << i
                signs[k] = s
            mx = xval[0]
            for i in range(1, 32):
                mx = max(mx, xval[i])
            L[:] = 0
            if mx == ZERO:
                scales[ib] = ZERO
                continue
            best = ZERO
            scale = mx / F32(15.0)
            on_grid[:] = False
            for is_ in range(-9, 10):
                inv = (F32(15.0) + F32(is_) * F32(0.2)) / mx
                this_scale = F32(1.0) / inv
                for k in range(8):
                    u = _levels4(xval, k, inv, Laux)
                    on_grid_aux[k] = True
                    if kmap[u] < 0:
                        on_grid_aux[k] = False
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, this_scale, Laux, 4 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(32):
                    q = F32(2 * Laux[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_grid_aux
            n_off = 0
            for k in range(8):
                if not on_grid[k]:
                    n_off += 1
            if n_off > 0 and scale > ZERO:
                inv = F32(1.0) / scale
                for k in range(8):   # every group, on the grid or not (as ggml runs it)
                    u = _levels4(xval, k, inv, L)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, scale, L, 4 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(32):
                    q = F32(2 * L[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO:
                    scale = sumqx / sumq2
            if scale < ZERO:
                scale = -scale
                for k in range(4):
                    signs[k] = (~signs[k]) & 255
            for k in range(8):
                u = 0
                for i in range(4):
                    u |= L[4 * k + i] << (3 * i)
                g = kmap[u]
                if g < 0:
                    raise ValueError("IQ3_S: a group off the grid after the search")
                out[o + 2 + 8 * ib + k] = g & 255
                out[o + 66 + ib] |= (g >> 8) << k
            for k in range(4):
                out[o + 74 + 4 * ib + k] = signs[k]
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == ZERO:
            continue
        d = max_scale / F32(31.0)
        bits = f32_to_f16_bits(d * F32(1.033))
        out[o] = bits & 255
        out[o + 1] = (bits >> 8) & 255
        inv = F32(1.0) / d
        for ib in range(0, 8, 2):
            l1 = max(0, min(15, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))))
            l2 = max(0, min(15, nearest_int(F32(0.5) * (inv * scales[ib + 1] - F32(1.0)))))
            out[o + 106 + ib // 2] = l1 | (l2 << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows_s(x, qw, weighted, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row_s(x[r], qw, weighted, grid, kmap, neighbours, out[r])


def quantize_iq3_s(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 or None (weights x^2, as ggml) ->
    (R, C / 256 * 110) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ3_S, ...) writes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"IQ3_S rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    weighted = importance is not None
    qw = np.ascontiguousarray(importance if weighted else np.zeros(rows.shape[1]), dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    grid, kmap, neighbours = lattice_tables("IQ3_S")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * S_BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows_s(rows, qw, weighted, grid, kmap, neighbours, out)
    return out
