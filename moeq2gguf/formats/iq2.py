"""IQ2_XXS (2.06 bits per weight), IQ2_XS (2.31) and IQ2_S (2.5): ports of ggml's quantizers, byte for byte.

A 256-weight super-block is an fp16 d and eight 32-weight sub-blocks; each sub-block is four groups of 8 weights
and one 32-bit word of 4 x 7 sign bits plus a 4-bit scale ls. A group is one of 256 grid points (8 magnitudes, each
one of three levels: value 2l+1 in the search, 8 / 25 / 43 in the runtime's table) with 7 stored signs; the 8th is
the parity of the 7, so a group always has an even number of negatives. Weight value: d * (0.5 + ls) / 4 * grid *
sign.

The search (ggml-quants.c's quantize_row_iq2_xxs_impl, which needs an importance vector):
- weights w = importance * sqrt(mean(x^2 over the super-block) + x^2); the neighbour search uses sqrt(w);
- per group |x|, and when the number of negatives is odd, the element with the smallest w x^2 flips sign (it stays
  negative through the search, so it lands on the lowest level);
- make_qp_quants gives a first scale s0 (keeping its codes in uint8: a negative code wraps, as in C); 13 candidate
  inverse scales (5 + 0.1 is) / (3 s0), is = -6..6: each rounds every group to levels, maps the level word to its
  grid point (or, off the grid, to the best of its precomputed neighbours), fits the least-squares scale, and the
  one with the largest sumqx^2 / sumq2 wins; the winner's groups are re-rounded once more and the scale refit;
- d = max sub-block scale / 31, ls = nearest_int((scale / d - 1) / 2) in 0..15.

The search tables (grid, kmap, neighbours) come from formats/iq_grids.py, built from the runtime's own grids.

IQ2_S (quantize_row_iq2_s_impl) is IQ2_XS's search on a 1024-point grid (10-bit indices, the high 2 bits in qh)
with all 8 signs stored (no parity trick), weights 0.25 sigma2 + x^2 without an importance vector (sigma2 =
2 mean(x^2)), a zero threshold of 1e-8 and d stored times 0.9875.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from moeq2gguf.formats.iq_grids import lattice_tables
from moeq2gguf.formats.numerics import F32, GROUP_MAX_EPS, ZERO, f32_to_f16_bits, nearest_int
from moeq2gguf.formats.search import make_qp_quants

QK_K = 256
BLOCK_BYTES = 66


def tables(kind: str = "IQ2_XXS") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid [n, 8] int8 in 2l+1 units, kmap int32, neighbours int32) of IQ2_XXS or IQ2_XS (formats/iq_grids.py)."""
    return lattice_tables(kind)


@njit(cache=True, error_model="numpy")
def _best_neighbour(neighbours, start, grid, xval, waux, scale, L, base):
    """iq2/iq3_find_best_neighbour: the listed grid point closest to xval / scale (weighted, strict <: the first of
    equals wins); writes its levels to L[base:base + dim]."""
    count = neighbours[start]
    best_d2 = np.float32(np.finfo(np.float32).max)
    best = -1
    dim = grid.shape[1]
    for j in range(1, count + 1):
        g = neighbours[start + j]
        d2 = ZERO
        for i in range(dim):
            diff = scale * F32(grid[g, i]) - xval[base + i]
            d2 += waux[base + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = g
    for i in range(dim):
        L[base + i] = (grid[best, i] - 1) // 2
    return best


@njit(cache=True, error_model="numpy")
def _group_levels(xval, k, inv, L):
    """Levels of group k at inverse scale inv and their word u (2 bits per coordinate)."""
    u = 0
    for i in range(8):
        l = nearest_int(F32(0.5) * (inv * xval[8 * k + i] - F32(1.0)))
        l = max(0, min(2, l))
        L[8 * k + i] = l
        u |= l << (2 * i)
    return u


@njit(cache=True, error_model="numpy")
def _quantize_row(x, qw, grid, kmap, neighbours, out):
    """One row: x [n] float32, qw [n] float32 importance -> out [n/256 * 66] uint8 (block_iq2_xxs)."""
    nbl = x.shape[0] // QK_K
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int64)
    Laux = np.zeros(32, dtype=np.int64)
    qp_codes = np.zeros(32, dtype=np.uint8)
    scales = np.empty(8, dtype=np.float32)
    signs = np.zeros(4, dtype=np.int64)
    q2 = np.zeros(16, dtype=np.uint32)
    for ibl in range(nbl):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        q2[:] = 0
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = sumx2 / F32(QK_K)
        for ib in range(8):
            xb = xbl[32 * ib:32 * ib + 32]
            qwb = qw[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * ib + 32]
            for i in range(32):
                weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
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
            if mx < GROUP_MAX_EPS:
                scales[ib] = ZERO
                continue
            scale = make_qp_quants(32, 4, xval, qp_codes, weight)   # only its scale is used; codes as C's uint8
            eff_max = scale * F32(3.0)
            if eff_max <= ZERO:
                scales[ib] = ZERO
                continue
            best = ZERO
            for is_ in range(-6, 7):
                inv = (F32(5.0) + F32(is_) * F32(0.1)) / eff_max
                this_scale = F32(1.0) / inv
                for k in range(4):
                    u = _group_levels(xval, k, inv, Laux)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, this_scale, Laux, 8 * k)
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
            if scale > ZERO:   # (with no winning candidate, make_qp_quants' scale: the groups are re-rounded at it)
                inv = F32(1.0) / scale
                for k in range(4):
                    u = _group_levels(xval, k, inv, L)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, scale, L, 8 * k)
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
            for k in range(4):
                u = 0
                for i in range(8):
                    u |= L[8 * k + i] << (2 * i)
                g = kmap[u]
                if g < 0:
                    raise ValueError("IQ2_XXS: a group off the grid after the search")
                q2[2 * ib] |= np.uint32(g) << np.uint32(8 * k)
                q2[2 * ib + 1] |= np.uint32(signs[k]) << np.uint32(7 * k)
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        o = ibl * BLOCK_BYTES
        if max_scale == ZERO:
            out[o:o + BLOCK_BYTES] = 0
            continue
        d = max_scale / F32(31.0)
        bits = f32_to_f16_bits(d)
        out[o] = bits & 255
        out[o + 1] = (bits >> 8) & 255
        inv = F32(1.0) / d
        for ib in range(8):
            l = nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))
            l = max(0, min(15, l))
            q2[2 * ib + 1] |= np.uint32(l) << np.uint32(28)
        for j in range(16):
            for b in range(4):
                out[o + 2 + 4 * j + b] = (q2[j] >> np.uint32(8 * b)) & np.uint32(255)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, qw, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, grid, kmap, neighbours, out[r])


def quantize_iq2_xxs(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 (required, as in ggml) ->
    (R, C / 256 * 66) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ2_XXS, ...) writes."""
    rows, qw = _check(rows, importance, "IQ2_XXS")
    grid, kmap, neighbours = tables("IQ2_XXS")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows(rows, qw, grid, kmap, neighbours, out)
    return out


XS_BLOCK_BYTES = 74


@njit(cache=True, error_model="numpy")
def _quantize_row_xs(x, qw, grid, kmap, neighbours, out):
    """ggml's quantize_row_iq2_xs_impl, one row -> out [n/256 * 74] uint8 (block_iq2_xs). Like IQ2_XXS with 16-weight
    sub-blocks, a 512-point grid, no make_qp_quants (the first scale is max / 5), 19 candidates (5 + 0.1 is) / max,
    is = -9..9, and a final re-rounding of only the groups the winner left off the grid."""
    nbl = x.shape[0] // QK_K
    weight = np.empty(16, dtype=np.float32)
    waux = np.empty(16, dtype=np.float32)
    xval = np.empty(16, dtype=np.float32)
    L = np.zeros(16, dtype=np.int64)
    Laux = np.zeros(16, dtype=np.int64)
    on_grid = np.ones(2, dtype=np.bool_)
    on_grid_aux = np.ones(2, dtype=np.bool_)
    scales = np.empty(16, dtype=np.float32)
    signs = np.zeros(2, dtype=np.int64)
    q2 = np.zeros(32, dtype=np.int64)
    for ibl in range(nbl):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        q2[:] = 0
        max_scale = ZERO
        sumx2 = ZERO
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = sumx2 / F32(QK_K)
        for ib in range(16):
            xb = xbl[16 * ib:16 * ib + 16]
            qwb = qw[QK_K * ibl + 16 * ib:QK_K * ibl + 16 * ib + 16]
            for i in range(16):
                weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
            for i in range(16):
                waux[i] = np.sqrt(weight[i])
            for k in range(2):
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
            for i in range(1, 16):
                mx = max(mx, xval[i])
            L[:] = 0
            if mx < GROUP_MAX_EPS:
                scales[ib] = ZERO
                continue
            best = ZERO
            scale = mx / F32(5.0)
            on_grid[:] = True
            for is_ in range(-9, 10):
                inv = (F32(5.0) + F32(is_) * F32(0.1)) / mx
                this_scale = F32(1.0) / inv
                for k in range(2):
                    u = _group_levels(xval, k, inv, Laux)
                    on_grid_aux[k] = True
                    if kmap[u] < 0:
                        on_grid_aux[k] = False
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, this_scale, Laux, 8 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(16):
                    q = F32(2 * Laux[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_grid_aux
            if (not on_grid[0] or not on_grid[1]) and scale > ZERO:
                inv = F32(1.0) / scale
                for k in range(2):
                    if on_grid[k]:
                        continue
                    u = _group_levels(xval, k, inv, L)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, scale, L, 8 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(16):
                    q = F32(2 * L[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO:
                    scale = sumqx / sumq2
            if scale < ZERO:
                scale = -scale
                for k in range(2):
                    signs[k] = (~signs[k]) & 127
            for k in range(2):
                u = 0
                for i in range(8):
                    u |= L[8 * k + i] << (2 * i)
                g = kmap[u]
                if g < 0:
                    raise ValueError("IQ2_XS: a group off the grid after the search")
                q2[2 * ib + k] = g | (signs[k] << 9)
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        o = ibl * XS_BLOCK_BYTES
        if max_scale == ZERO:
            out[o:o + XS_BLOCK_BYTES] = 0
            continue
        d = max_scale / F32(31.0)
        bits = f32_to_f16_bits(d)
        out[o] = bits & 255
        out[o + 1] = (bits >> 8) & 255
        for j in range(32):
            out[o + 2 + 2 * j] = q2[j] & 255
            out[o + 3 + 2 * j] = (q2[j] >> 8) & 255
        inv = F32(1.0) / d
        for ib in range(16):
            l = nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))
            l = max(0, min(15, l))
            if ib % 2 == 0:
                out[o + 66 + ib // 2] = l
            else:
                out[o + 66 + ib // 2] |= l << 4


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows_xs(x, qw, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row_xs(x[r], qw, grid, kmap, neighbours, out[r])


def quantize_iq2_xs(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 (required, as in ggml) ->
    (R, C / 256 * 74) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ2_XS, ...) writes."""
    rows, qw = _check(rows, importance, "IQ2_XS")
    grid, kmap, neighbours = tables("IQ2_XS")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * XS_BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows_xs(rows, qw, grid, kmap, neighbours, out)
    return out


def _check(rows, importance, name: str) -> tuple[np.ndarray, np.ndarray]:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"{name} rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    if importance is None:
        raise ValueError(f"{name} needs an importance vector (llama.cpp refuses it without an imatrix too)")
    qw = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    return rows, qw


S_BLOCK_BYTES = 82
GROUP_MAX_EPS_IQ2_S = F32(1e-8)


@njit(cache=True, error_model="numpy")
def _quantize_row_s(x, qw, weighted, grid, kmap, neighbours, out):
    nbl = x.shape[0] // QK_K
    weight = np.empty(16, dtype=np.float32)
    waux = np.empty(16, dtype=np.float32)
    xval = np.empty(16, dtype=np.float32)
    L = np.zeros(16, dtype=np.int64)
    Laux = np.zeros(16, dtype=np.int64)
    on_grid = np.ones(2, dtype=np.bool_)
    on_grid_aux = np.ones(2, dtype=np.bool_)
    scales = np.empty(16, dtype=np.float32)
    signs = np.zeros(2, dtype=np.int64)
    for ibl in range(nbl):
        o = ibl * S_BLOCK_BYTES
        out[o:o + S_BLOCK_BYTES] = 0
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
                    weight[i] = F32(0.25) * sigma2 + xb[i] * xb[i]
            for i in range(16):
                waux[i] = np.sqrt(weight[i])
            for k in range(2):
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= ZERO:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        s |= 1 << i
                signs[k] = s
            mx = xval[0]
            for i in range(1, 16):
                mx = max(mx, xval[i])
            L[:] = 0
            if mx < GROUP_MAX_EPS_IQ2_S:
                scales[ib] = ZERO
                continue
            best = ZERO
            scale = mx / F32(5.0)
            on_grid[:] = True
            for is_ in range(-9, 10):
                inv = (F32(5.0) + F32(is_) * F32(0.1)) / mx
                this_scale = F32(1.0) / inv
                for k in range(2):
                    u = _group_levels(xval, k, inv, Laux)
                    on_grid_aux[k] = True
                    if kmap[u] < 0:
                        on_grid_aux[k] = False
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, this_scale, Laux, 8 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(16):
                    q = F32(2 * Laux[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    L[:] = Laux
                    on_grid[:] = on_grid_aux
            if (not on_grid[0] or not on_grid[1]) and scale > ZERO:
                inv = F32(1.0) / scale
                for k in range(2):
                    if on_grid[k]:
                        continue
                    u = _group_levels(xval, k, inv, L)
                    if kmap[u] < 0:
                        _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, scale, L, 8 * k)
                sumqx = ZERO
                sumq2 = ZERO
                for i in range(16):
                    q = F32(2 * L[i] + 1)
                    sumqx += weight[i] * xval[i] * q
                    sumq2 += weight[i] * q * q
                if sumq2 > ZERO:
                    scale = sumqx / sumq2
            if scale < ZERO:
                scale = -scale
                for k in range(2):
                    signs[k] = (~signs[k]) & 255
            for k in range(2):
                u = 0
                for i in range(8):
                    u |= L[8 * k + i] << (2 * i)
                g = kmap[u]
                if g < 0:
                    raise ValueError("IQ2_S: a group off the grid after the search")
                i8 = 2 * ib + k
                out[o + 2 + i8] = g & 255
                out[o + 66 + i8 // 4] |= (g >> 8) << (2 * (i8 % 4))
                out[o + 2 + 32 + i8] = signs[k]
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == ZERO:
            continue
        d = max_scale / F32(31.0)
        bits = f32_to_f16_bits(d * F32(0.9875))
        out[o] = bits & 255
        out[o + 1] = (bits >> 8) & 255
        inv = F32(1.0) / d
        for ib in range(16):
            l = max(0, min(15, nearest_int(F32(0.5) * (inv * scales[ib] - F32(1.0)))))
            if ib % 2 == 0:
                out[o + 74 + ib // 2] = l
            else:
                out[o + 74 + ib // 2] |= l << 4


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows_s(x, qw, weighted, grid, kmap, neighbours, out):
    for r in prange(x.shape[0]):
        _quantize_row_s(x[r], qw, weighted, grid, kmap, neighbours, out[r])


def quantize_iq2_s(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """rows (R, C) float32 with C a multiple of 256, importance (C,) float32 or None (weights 0.25 sigma2 + x^2, as
    ggml) -> (R, C / 256 * 82) uint8: the bytes ggml_quantize_chunk(GGML_TYPE_IQ2_S, ...) writes."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"IQ2_S rows must be (R, C) with C a multiple of 256, got {rows.shape}")
    weighted = importance is not None
    qw = np.ascontiguousarray(importance if weighted else np.zeros(rows.shape[1]), dtype=np.float32).reshape(-1)
    if qw.shape[0] != rows.shape[1]:
        raise ValueError(f"importance has {qw.shape[0]} values for rows of {rows.shape[1]}")
    grid, kmap, neighbours = lattice_tables("IQ2_S")
    out = np.empty((rows.shape[0], rows.shape[1] // QK_K * S_BLOCK_BYTES), dtype=np.uint8)
    _quantize_rows_s(rows, qw, weighted, grid, kmap, neighbours, out)
    return out
