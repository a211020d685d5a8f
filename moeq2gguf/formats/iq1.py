"""IQ1_S (1.56 bits per weight) and IQ1_M (1.75): ports of ggml's quantizers, byte for byte.

A 256-weight super-block is an fp16 d (stored times 1.125) and eight 32-weight sub-blocks; a sub-block is four
groups of 8 weights, each one of 2048 grid points with coordinates in {-1, 0, 1} (11-bit indices: 8 bits in qs, 3 in
qh), one 3-bit scale ls and one shift bit: the sub-block's values are d (2 ls + 1) (g + delta), delta = +-1/8.

The search (ggml requires an importance vector): weights w = importance * sqrt(2 mean(x^2) + x^2); within a
sub-block the values are sorted (stable, as glibc's qsort for 32 elements) and every split into three runs (the low
run at -1 + delta, the middle at delta, the high at 1 + delta, for delta = +1/8 and -1/8) is scored by the
least-squares scale; the best split gives each weight its level; a group whose level word is off the grid takes the
best of its neighbours (the grid points at the three smallest distances); when some group moved, the scale is
refit; d = max scale / 15, ls = nearest_int((scale / d - 1) / 2) in 0..7, bit 15 of qh set for delta = -1/8.

IQ1_M (quantize_row_iq1_m_impl): 16-weight sub-blocks of two groups, each group with its own delta sign (4 sign
combinations scored per split, with per-half prefix sums in ggml's collapsed form), weights x^2 without an importance
vector, zero threshold 1e-7; no stored d: after the scales are quantized, d is refit by least squares over the whole
super-block (zero sub-blocks included, at grid point 0), stored times 1.1125 as an fp16 split in four nibbles on top
of the four 16-bit scale words.
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


M_BLOCK_BYTES = 56
GROUP_MAX_EPS_IQ1_M = F32(1e-7)


@njit(cache=True, error_model="numpy")
def _quantize_row_m(x, qw, weighted, grid, kmap, neighbours, out):
    nbl = x.shape[0] // QK_K
    x_p = np.array([F32(-1.0) + DELTA, DELTA, F32(1.0) + DELTA], dtype=np.float32)
    x_m = np.array([F32(-1.0) - DELTA, -DELTA, F32(1.0) - DELTA], dtype=np.float32)
    masks = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)
    weight = np.empty(16, dtype=np.float32)
    px = np.empty((2, 17), dtype=np.float32)
    pw = np.empty((2, 17), dtype=np.float32)
    qx_p = np.empty(2, dtype=np.float32)
    qx_m = np.empty(2, dtype=np.float32)
    q2_p = np.empty(2, dtype=np.float32)
    q2_m = np.empty(2, dtype=np.float32)
    sumqx = np.empty(4, dtype=np.float32)
    sumq2 = np.empty(4, dtype=np.float32)
    L = np.zeros(16, dtype=np.int64)
    index = np.zeros(2, dtype=np.int64)
    scales = np.empty(16, dtype=np.float32)
    shifts = np.empty(16, dtype=np.int64)
    qs = np.zeros(32, dtype=np.int64)
    qh = np.zeros(16, dtype=np.int64)
    sc = np.zeros(4, dtype=np.int64)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    for ibl in range(nbl):
        qs[:] = 0
        qh[:] = 0
        sc[:] = 0
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = F32(2.0) * sumx2 / F32(QK_K)
        for ib in range(16):
            xb = xbl[16 * ib:16 * ib + 16]
            for i in range(16):
                if weighted:
                    weight[i] = qw[QK_K * ibl + 16 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = xb[i] * xb[i]
            mx = abs(xb[0])
            for i in range(1, 16):
                mx = max(mx, abs(xb[i]))
            if mx < GROUP_MAX_EPS_IQ1_M:
                scales[ib] = ZERO
                shifts[ib] = 0
                continue
            idx = np.argsort(xb, kind="mergesort")   # stable, as glibc's qsort sorts 16 pairs
            px[0, 0] = ZERO
            px[1, 0] = ZERO
            pw[0, 0] = ZERO
            pw[1, 0] = ZERO
            for j in range(16):
                i = idx[j]
                h = 0 if i < 8 else 1
                px[h, j + 1] = px[h, j] + weight[i] * xb[i]
                px[1 - h, j + 1] = px[1 - h, j]
                pw[h, j + 1] = pw[h, j] + weight[i]
                pw[1 - h, j + 1] = pw[1 - h, j]
            txs0, txs1 = px[0, 16], px[1, 16]
            tws0, tws1 = pw[0, 16], pw[1, 16]
            best_score = -np.float32(np.finfo(np.float32).max)
            scale = mx
            besti1 = -1
            besti2 = -1
            best_k = -1
            for i1 in range(17):
                for i2 in range(i1, 17):
                    for h in range(2):
                        sx = px[h, i1] + px[h, i2]
                        txs = txs0 if h == 0 else txs1
                        tws = tws0 if h == 0 else tws1
                        qx_p[h] = txs * p2 - sx
                        qx_m[h] = txs * m2 - sx
                        q2_p[h] = tws * p2 * p2 + pw[h, i1] * cp1 + pw[h, i2] * cp2
                        q2_m[h] = tws * m2 * m2 + pw[h, i1] * cm1 + pw[h, i2] * cm2
                    sumqx[0] = qx_p[0] + qx_p[1]
                    sumqx[1] = qx_p[0] + qx_m[1]
                    sumqx[2] = qx_m[0] + qx_p[1]
                    sumqx[3] = qx_m[0] + qx_m[1]
                    sumq2[0] = q2_p[0] + q2_p[1]
                    sumq2[1] = q2_p[0] + q2_m[1]
                    sumq2[2] = q2_m[0] + q2_p[1]
                    sumq2[3] = q2_m[0] + q2_m[1]
                    for k in range(4):
                        if sumq2[k] > ZERO and sumqx[k] * sumqx[k] > best_score * sumq2[k]:
                            scale = sumqx[k] / sumq2[k]
                            best_score = scale * sumqx[k]
                            besti1 = i1
                            besti2 = i2
                            best_k = k
            if besti1 < 0 or besti2 < 0 or best_k < 0:
                scales[ib] = ZERO
                shifts[ib] = 0
                continue
            for j in range(16):
                L[idx[j]] = 0 if j < besti1 else (1 if j < besti2 else 2)
            if scale < ZERO:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                best_k = 3 - best_k
            all_on_grid = True
            for k in range(2):
                if k == 0:
                    xx = x_p if best_k < 2 else x_m
                else:
                    xx = x_p if best_k % 2 == 0 else x_m
                u = 0
                for j in range(8):
                    u |= L[8 * k + j] << (2 * j)
                g = kmap[u]
                if g < 0:
                    all_on_grid = False
                    g = _best_neighbour_iq1(neighbours, -g - 1, grid, xb, weight, 8 * k, scale, xx, L)
                index[k] = g
            if not all_on_grid:
                sumqx_f = ZERO
                sumq2_f = ZERO
                for k in range(2):
                    if k == 0:
                        xx = x_p if best_k < 2 else x_m
                    else:
                        xx = x_p if best_k % 2 == 0 else x_m
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(grid[index[k], j] - 1) // 2]
                        sumqx_f += w * q * xb[8 * k + j]
                        sumq2_f += w * q * q
                if sumqx_f > ZERO and sumq2_f > ZERO:
                    scale = sumqx_f / sumq2_f
            qs[2 * ib] = index[0] & 255
            qs[2 * ib + 1] = index[1] & 255
            qh[ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            scales[ib] = scale
            shifts[ib] = best_k
            max_scale = max(max_scale, scale)
        o = ibl * M_BLOCK_BYTES
        out[o:o + M_BLOCK_BYTES] = 0
        if max_scale == ZERO:
            continue
        d = max_scale / F32(15.0)
        inv = F32(1.0) / d
        sumqx_f = ZERO
        sumq2_f = ZERO
        for ib in range(16):
            l = max(0, min(7, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))))
            sc[ib // 4] |= l << (3 * (ib % 4))
            qh[ib] |= masks[shifts[ib]]
            xb = xbl[16 * ib:16 * ib + 16]
            for i in range(16):
                if weighted:
                    weight[i] = qw[QK_K * ibl + 16 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = xb[i] * xb[i]
            for k in range(2):
                if k == 0:
                    xx = x_p if shifts[ib] < 2 else x_m
                else:
                    xx = x_p if shifts[ib] % 2 == 0 else x_m
                g = qs[2 * ib + k] + ((qh[ib] << (8 - 4 * k)) & 0x700)
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(grid[g, j] - 1) // 2] * F32(2 * l + 1)
                    sumqx_f += w * q * xb[8 * k + j]
                    sumq2_f += w * q * q
        if sumq2_f > ZERO:
            d = sumqx_f / sumq2_f
        bits = f32_to_f16_bits(d * F32(1.1125))
        sc[0] |= (bits & 0x000F) << 12
        sc[1] |= (bits & 0x00F0) << 8
        sc[2] |= (bits & 0x0F00) << 4
        sc[3] |= bits & 0xF000
        for j in range(32):
            out[o + j] = qs[j]
        for j in range(16):
            out[o + 32 + j] = qh[j] & 255
        for j in range(4):
            out[o + 48 + 2 * j] = sc[j] & 255
            out[o + 49 + 2 * j] = (sc[j] >> 8) & 255


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows_m(x, qw, weighted, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row_m(x[r], qw, weighted, grid, kmap, neighbours, out[r])


def quantize_iq1_m(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 or None (weights x^2) ->
    (R, C / 256 * 56) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ1_M, ...) writes (llama-quantize itself
    refuses IQ1_M without an imatrix)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"IQ1_M rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    weighted = importance is not None
    qw = np.ascontiguousarray(importance if weighted else np.zeros(rows.shape[1]), dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    grid, kmap, neighbours = lattice_tables("IQ1_S")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * M_BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows_m(rows, qw, weighted, grid, kmap, neighbours, out)
    return out
