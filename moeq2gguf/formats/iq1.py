"""IQ1_S (1.56 bits per weight): a port of ggml's quantizer (quantize_row_iq1_s_impl), byte for byte.

A 256-weight super-block is an fp16 d (stored times 1.125) and eight 32-weight sub-blocks; a sub-block is four
groups of 8 weights, each one of 2048 grid points with coordinates in {-1, 0, 1} (11-bit indices: 8 bits in qs, 3 in
qh), one 3-bit scale ls and one shift bit: the sub-block's values are d (2 ls + 1) (g + delta), delta = +-1/8.

The search (ggml requires an importance vector): weights w = importance * sqrt(2 mean(x^2) + x^2); within a
sub-block the values are sorted (stable, as glibc's qsort for 32 elements) and every split into three runs (the low
run at -1 + delta, the middle at delta, the high at 1 + delta, for delta = +1/8 and -1/8) is scored by the
least-squares scale; the best split gives each weight its level; a group whose level word is off the grid takes the
best of its neighbours (the grid points at the three smallest distances); when some group moved, the scale is
refit; d = max scale / 15, ls = nearest_int((scale / d - 1) / 2) in 0..7, bit 15 of qh set for delta = -1/8.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from moeq2gguf.formats.iq_grids import lattice_tables
from moeq2gguf.formats.numerics import F32, ZERO, f32_to_f16_bits, nearest_int

QK_K = 256
BLOCK_BYTES = 50
DELTA = F32(0.125)
GROUP_MAX_EPS_IQ1_S = F32(1e-12)


@njit(cache=True, error_model="numpy")
def _best_neighbour_iq1(neighbours, start, grid, xb, w, base, scale, xx, L):
    count = neighbours[start]
    best_score = np.float32(np.finfo(np.float32).max)
    best = -1
    for j in range(1, count + 1):
        g = neighbours[start + j]
        d2 = ZERO
        for i in range(8):
            q = xx[(grid[g, i] - 1) // 2]
            diff = scale * q - xb[base + i]
            d2 += w[base + i] * diff * diff
        if d2 < best_score:
            best_score = d2
            best = g
    if best < 0:
        raise ValueError("IQ1_S: no neighbour scored (non-finite weights?)")
    for i in range(8):
        L[base + i] = (grid[best, i] - 1) // 2
    return best


@njit(cache=True, error_model="numpy")
def _quantize_row(x, qw, grid, kmap, neighbours, out):
    nbl = x.shape[0] // QK_K
    x_p = np.array([F32(-1.0) + DELTA, DELTA, F32(1.0) + DELTA], dtype=np.float32)
    x_m = np.array([F32(-1.0) - DELTA, -DELTA, F32(1.0) - DELTA], dtype=np.float32)
    weight = np.empty(32, dtype=np.float32)
    sumx = np.empty(33, dtype=np.float32)
    sumw = np.empty(33, dtype=np.float32)
    L = np.zeros(32, dtype=np.int64)
    index = np.zeros(4, dtype=np.int64)
    scales = np.empty(8, dtype=np.float32)
    shifts = np.empty(8, dtype=np.int64)
    qh = np.zeros(8, dtype=np.int64)
    for ibl in range(nbl):
        o = ibl * BLOCK_BYTES
        out[o:o + BLOCK_BYTES] = 0
        qh[:] = 0
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = F32(2.0) * sumx2 / F32(QK_K)
        for ib in range(8):
            xb = xbl[32 * ib:32 * ib + 32]
            for i in range(32):
                weight[i] = qw[QK_K * ibl + 32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
            mx = abs(xb[0])
            for i in range(1, 32):
                mx = max(mx, abs(xb[i]))
            if mx < GROUP_MAX_EPS_IQ1_S:
                scales[ib] = ZERO
                shifts[ib] = 1
                continue
            idx = np.argsort(xb, kind="mergesort")   # stable, as glibc's qsort sorts 32 pairs
            sumx[0] = ZERO
            sumw[0] = ZERO
            for j in range(32):
                i = idx[j]
                sumx[j + 1] = sumx[j] + weight[i] * xb[i]
                sumw[j + 1] = sumw[j] + weight[i]
            best_score = -np.float32(np.finfo(np.float32).max)
            scale = mx
            besti1 = -1
            besti2 = -1
            best_shift = 0
            for i1 in range(33):
                for i2 in range(i1, 33):
                    sumqx = (sumx[i1] - sumx[0]) * x_p[0] + (sumx[i2] - sumx[i1]) * x_p[1] + (sumx[32] - sumx[i2]) * x_p[2]
                    sumq2 = ((sumw[i1] - sumw[0]) * x_p[0] * x_p[0] + (sumw[i2] - sumw[i1]) * x_p[1] * x_p[1]
                             + (sumw[32] - sumw[i2]) * x_p[2] * x_p[2])
                    if sumq2 > ZERO and sumqx * sumqx > best_score * sumq2:
                        scale = sumqx / sumq2
                        best_score = scale * sumqx
                        besti1 = i1
                        besti2 = i2
                        best_shift = 1
                    sumqx = (sumx[i1] - sumx[0]) * x_m[0] + (sumx[i2] - sumx[i1]) * x_m[1] + (sumx[32] - sumx[i2]) * x_m[2]
                    sumq2 = ((sumw[i1] - sumw[0]) * x_m[0] * x_m[0] + (sumw[i2] - sumw[i1]) * x_m[1] * x_m[1]
                             + (sumw[32] - sumw[i2]) * x_m[2] * x_m[2])
                    if sumq2 > ZERO and sumqx * sumqx > best_score * sumq2:
                        scale = sumqx / sumq2
                        best_score = scale * sumqx
                        besti1 = i1
                        besti2 = i2
                        best_shift = -1
            if besti1 < 0 or besti2 < 0 or best_shift == 0:
                scales[ib] = ZERO
                shifts[ib] = 1
                continue
            for j in range(32):
                L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
            if scale < ZERO:
                for j in range(32):
                    L[j] = 2 - L[j]
                scale = -scale
                best_shift = -best_shift
            xx = x_p if best_shift == 1 else x_m
            all_on_grid = True
            for k in range(4):
                u = 0
                for j in range(8):
                    u |= L[8 * k + j] << (2 * j)
                g = kmap[u]
                if g < 0:
                    all_on_grid = False
                    g = _best_neighbour_iq1(neighbours, -g - 1, grid, xb, weight, 8 * k, scale, xx, L)
                index[k] = g
            if not all_on_grid:
                sumqx = ZERO
                sumq2 = ZERO
                for k in range(4):
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(grid[index[k], j] - 1) // 2]
                        sumqx += w * q * xb[8 * k + j]
                        sumq2 += w * q * q
                if sumqx > ZERO and sumq2 > ZERO:
                    scale = sumqx / sumq2
            h = 0
            for k in range(4):
                out[o + 2 + 4 * ib + k] = index[k] & 255
                h |= (index[k] >> 8) << (3 * k)
            qh[ib] = h
            scales[ib] = scale
            shifts[ib] = best_shift
            max_scale = max(max_scale, scale)
        if max_scale != ZERO:
            d = max_scale / F32(15.0)
            bits = f32_to_f16_bits(d * F32(1.125))
            out[o] = bits & 255
            out[o + 1] = (bits >> 8) & 255
            inv = F32(1.0) / d
            for ib in range(8):
                l = max(0, min(7, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))))
                if shifts[ib] == -1:
                    l |= 8
                qh[ib] |= l << 12
        else:   # ggml leaves d = 0 and qh as the sub-blocks wrote it (no scales)
            pass
        for ib in range(8):
            out[o + 34 + 2 * ib] = qh[ib] & 255
            out[o + 35 + 2 * ib] = (qh[ib] >> 8) & 255


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, qw, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, grid, kmap, neighbours, out[r])


def quantize_iq1_s(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 (required, as in ggml) ->
    (R, C / 256 * 50) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ1_S, ...) writes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"IQ1_S rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    if importance is None:
        raise ValueError("IQ1_S needs an importance vector (llama.cpp refuses it without an imatrix too)")
    qw = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    grid, kmap, neighbours = lattice_tables("IQ1_S")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows(rows, qw, grid, kmap, neighbours, out)
    return out
