"""The original 32-weight formats Q4_0, Q5_0 (symmetric) and Q4_1, Q5_1 (scale + min).

Without an importance vector ggml uses the `_ref` quantizers: absmax (or min/max) scale, codes by
truncating x/d + offset. With one it uses `quantize_row_qX_impl`: each block weighted by
importance * sqrt(sigma2 + x**2), sigma2 the mean square of the *whole row*, then make_qx_quants
(symmetric) or make_qkx3_quants (scale + min).

Kernels come in pairs: a `_row` function doing the work for one row, and a parallel driver over
rows (numba vectorizes a plain function's loops better than a prange body's). Block loops take
the block size as a run-time argument so that LLVM vectorizes them instead of unrolling them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, _row_sigma2, gather_columns
from moeq2gguf.formats.numerics import (F32, HALF, KEY_MAX_FINITE, KEY_MIN_FINITE, ONE, ZERO, f32_as_i32,
                                        f32_to_f16_bits, fp16_round, key_value, nearest_int_saturating, order_key)
from moeq2gguf.formats.search import SCRATCH_WIDTH, make_qkx_quants, make_qx_quants

QK = 32
_QKX3_RMIN = F32(-0.9)
_QKX3_RDELTA = F32(0.05)


@njit(cache=True, error_model="numpy", inline="always")
def _put_f16(out, o, value):
    h = f32_to_f16_bits(value)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


@njit(cache=True, error_model="numpy", inline="always")
def _put_u32(out, o, value):
    for k in range(4):
        out[o + k] = np.uint8((value >> (8 * k)) & 0xFF)


# ---------------------------------------------------------------------------- symmetric: Q4_0, Q5_0

@dataclasses.dataclass(frozen=True)
class SymmetricParams(BlockParams):
    """d: (R, nb) float32 fp16 scale; inv: (R, nb) float32, the inverse scale codes are rounded with;
    weighted: whether the importance (`_impl`) rounding rule applies:
      unweighted: code = min(2n-1, trunc(x*inv + n + 0.5))          (n = 8 for Q4_0, 16 for Q5_0)
      weighted:   code = n + clamp(nearest_int(inv*x), -n, n-1), or 0 in an all-zero block (inv 0)."""
    d: np.ndarray
    inv: np.ndarray
    weighted: bool


@njit(cache=True, error_model="numpy", inline="always")
def _absmax_signed(x, base, qk):
    """(|x| bits of the largest magnitude, the first weight with that magnitude) of one block, as
    ggml's strict '<' scan finds it; magnitudes compare as integers (exact, and it vectorizes)."""
    amax_bits = np.int32(0)
    for j in range(qk):
        amax_bits = max(amax_bits, np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)))
    first = np.int32(qk)
    for j in range(qk):
        hit = np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)) == amax_bits
        first = min(first, np.int32(j) if hit else np.int32(qk))
    return amax_bits, (x[base + first] if amax_bits != 0 else ZERO)


@njit(cache=True, error_model="numpy")
def _fit_symmetric_row(x, qrow, weighted, sigma2, nmax, qk, d, inv, codes, weight, scratch):
    fnmax = F32(nmax)
    offset = fnmax + HALF
    top = np.int32(2 * nmax - 1)
    for b in range(x.shape[0] // qk):
        base = b * qk
        xb = x[base:base + qk]
        if weighted:
            for j in range(qk):
                weight[j] = qrow[base + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            scale, iscale = make_qx_quants(qk, nmax, xb, codes[base:base + qk], weight, True, scratch)
        else:
            _, max_v = _absmax_signed(x, base, qk)
            scale = max_v / -fnmax
            iscale = ONE / scale if scale != ZERO else ZERO
            for j in range(qk):
                codes[base + j] = min(top, np.int32(xb[j] * iscale + offset))
        d[b] = fp16_round(scale)
        inv[b] = iscale


@njit(parallel=True, cache=True, error_model="numpy")
def _fit_symmetric(x, qw, sigma2, nmax, qk, scratch_width, d, inv, codes):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        weight = np.empty(qk, np.float32)
        scratch = np.empty((3, scratch_width), np.float32)
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_symmetric_row(x[r], qrow, weighted, sigma2[r], nmax, qk, d[r], inv[r], codes[r], weight, scratch)


# block_q4_0, 18 bytes:
#   byte  0       2                                                   18
#         | d f16 | qs[16]: qs[j] = code[j] | code[j+16] << 4            |
#   weight j = d * (code[j] - 8)
# block_q5_0, 22 bytes:
#   byte  0       2                              6                                        22
#         | d f16 | qh u32 LE: bit j = code[j] >> 4 | qs[16]: low nibbles as in Q4_0        |
#   weight j = d * (code[j] - 16)
@njit(cache=True, error_model="numpy", inline="always")
def _pack_symmetric_block(out, o, nmax, d, lo_codes, hi_codes, half):
    _put_f16(out, o, d)
    if nmax == 8:
        for j in range(half):
            out[o + 2 + j] = np.uint8((lo_codes[j] | (hi_codes[j] << 4)) & 0xFF)
    else:
        qh = np.int32(0)
        for j in range(half):
            lo = np.int32(lo_codes[j])
            hi = np.int32(hi_codes[j])
            out[o + 6 + j] = np.uint8(((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF)
            qh |= (((lo >> 4) & 1) << j) | (((hi >> 4) & 1) << (j + half))
        _put_u32(out, o + 2, qh)


@njit(cache=True, error_model="numpy")
def _pack_symmetric_row(codes, d, nmax, qk, out):
    type_size = 18 if nmax == 8 else 22
    half = qk // 2
    for b in range(d.shape[0]):
        base = b * qk
        _pack_symmetric_block(out, b * type_size, nmax, d[b], codes[base:base + half], codes[base + half:base + qk],
                              half)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_symmetric(codes, d, nmax, qk, out):
    for r in prange(d.shape[0]):
        _pack_symmetric_row(codes[r], d[r], nmax, qk, out[r])


@njit(cache=True, error_model="numpy")
def _quantize_symmetric_row(x, nmax, qk, out):
    """_fit_symmetric_row (no importance) + _pack_symmetric_row in one pass, written out in one
    function (the hot path of the cheapest formats); returns whether the row holds NaN/Inf."""
    half = qk // 2
    fnmax = F32(nmax)
    offset = fnmax + HALF
    top = np.int32(2 * nmax - 1)
    type_size = 18 if nmax == 8 else 22
    bad = False
    for b in range(x.shape[0] // qk):
        base = b * qk
        amax_bits = np.int32(0)
        for j in range(qk):
            amax_bits = max(amax_bits, np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)))
        first = np.int32(qk)
        for j in range(qk):
            hit = np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)) == amax_bits
            first = min(first, np.int32(j) if hit else np.int32(qk))
        max_v = x[base + first] if amax_bits != 0 else ZERO
        bad |= amax_bits >= np.int32(0x7F800000)
        scale = max_v / -fnmax
        iscale = ONE / scale if scale != ZERO else ZERO
        o = b * type_size
        _put_f16(out, o, scale)
        if nmax == 8:
            for j in range(half):
                lo = min(top, np.int32(x[base + j] * iscale + offset))
                hi = min(top, np.int32(x[base + half + j] * iscale + offset))
                out[o + 2 + j] = np.uint8((lo | (hi << 4)) & 0xFF)
        else:
            qh = np.int32(0)
            for j in range(half):
                lo = min(top, np.int32(x[base + j] * iscale + offset))
                hi = min(top, np.int32(x[base + half + j] * iscale + offset))
                out[o + 6 + j] = np.uint8(((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF)
                qh |= (((lo >> 4) & 1) << j) | (((hi >> 4) & 1) << (j + half))
            _put_u32(out, o + 2, qh)
    return bad


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_symmetric(x, nmax, qk, out, nonfinite):
    for r in prange(x.shape[0]):
        nonfinite[r] = _quantize_symmetric_row(x[r], nmax, qk, out[r])


@njit(cache=True, error_model="numpy")
def _to_grid_symmetric_row(values, inv, weighted, nmax, offset_cols, out):
    offset = F32(nmax) + HALF
    top = 2 * nmax - 1
    for c in range(values.shape[0]):
        iscale = inv[(offset_cols + c) // QK]
        if weighted:
            if iscale == ZERO:
                out[c] = 0
            else:
                l = nearest_int_saturating(iscale * values[c])
                out[c] = nmax + max(-nmax, min(nmax - 1, l))
        else:
            t = values[c] * iscale + offset
            if t <= ZERO:
                out[c] = 0
            elif t >= F32(top):
                out[c] = top
            else:
                out[c] = np.int32(t)


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_symmetric(values, inv, weighted, nmax, offset_cols, out):
    for r in prange(values.shape[0]):
        _to_grid_symmetric_row(values[r], inv[r], weighted, nmax, offset_cols, out[r])


class _Symmetric(BlockFormat):
    nmax: int
    params_type = SymmetricParams

    def _quantize_fused(self, x):
        out = np.empty((x.shape[0], x.shape[1] // QK * self.type_size), np.uint8)
        nonfinite = np.empty(x.shape[0], np.bool_)
        _quantize_symmetric(x, self.nmax, QK, out, nonfinite)
        return out, nonfinite

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        nb = n_cols // QK
        if qw.shape[0] and sigma2 is None:
            sigma2 = np.empty(n_rows, np.float32)
            _row_sigma2(x, sigma2)
        elif sigma2 is None:
            sigma2 = np.zeros(n_rows, np.float32)
        d = np.empty((n_rows, nb), np.float32)
        inv = np.empty((n_rows, nb), np.float32)
        codes = np.empty((n_rows, n_cols), np.uint8)
        _fit_symmetric(x, qw, sigma2, self.nmax, QK, SCRATCH_WIDTH, d, inv, codes)
        return SymmetricParams(d=d, inv=inv, weighted=bool(qw.shape[0])), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_symmetric(codes, params.d, self.nmax, QK, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid_symmetric(values, params.inv, params.weighted, self.nmax, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: d * float32(code - n)
        return gather_columns(params.d, cols, QK) * (codes - self.nmax).astype(np.float32)


class Q4_0(_Symmetric, qtype=GGMLQuantizationType.Q4_0):
    nmax = 8
    code_max = 15


class Q5_0(_Symmetric, qtype=GGMLQuantizationType.Q5_0):
    nmax = 16
    code_max = 31


# ---------------------------------------------------------------------------- scale + min: Q4_1, Q5_1

@dataclasses.dataclass(frozen=True)
class AffineParams(BlockParams):
    """d, m: (R, nb) float32, the fp16 scale and offset (weight = d*code + m);
    inv, shift: (R, nb) float32, the rounding rule ggml used for the codes:
      unweighted: code = trunc((x - shift)*inv + 0.5), clamped to [0, nmax]
      weighted:   code = clamp(nearest_int(inv*(x - shift)), 0, nmax)."""
    d: np.ndarray
    m: np.ndarray
    inv: np.ndarray
    shift: np.ndarray
    weighted: bool


@njit(cache=True, error_model="numpy", inline="always")
def _first_zero(x, start, n):
    """The first of n weights from start that compares equal to 0 (so -0.0 and 0.0 keep their sign
    as ggml's sequential min/max scan keeps them)."""
    for j in range(start, start + n):
        if x[j] == ZERO:
            return x[j]
    return ZERO


@njit(cache=True, error_model="numpy", inline="always")
def _min_max(x, base, qk):
    """(min, max, any NaN/Inf) of one block exactly as ggml's sequential scan finds them:
    integer reductions over order-preserving keys (exact, and they vectorize); a zero extreme
    takes the sign of the block's first zero, as the strict '<'/'>' scan keeps it."""
    kmin = np.int32(0x7FFFFFFF)
    kmax = np.int32(-0x7FFFFFFF - 1)
    for j in range(qk):
        k = order_key(x[base + j])
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    min_v = key_value(kmin)
    max_v = key_value(kmax)
    if min_v == ZERO:
        min_v = _first_zero(x, base, qk)
    if max_v == ZERO:
        max_v = _first_zero(x, base, qk)
    return min_v, max_v, (kmax > KEY_MAX_FINITE) | (kmin < KEY_MIN_FINITE)


@njit(cache=True, error_model="numpy")
def _fit_affine_row(x, qrow, weighted, sigma2, nmax, qk, d, m, inv, shift, codes, weight, scratch):
    fnmax = F32(nmax)
    top = np.int32(nmax)
    for b in range(x.shape[0] // qk):
        base = b * qk
        xb = x[base:base + qk]
        if weighted:
            for j in range(qk):
                weight[j] = qrow[base + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            scale, the_min, iscale, sh = make_qkx_quants(qk, nmax, xb, weight, codes[base:base + qk],
                                                         _QKX3_RMIN, _QKX3_RDELTA, 36, False, scratch)
            d[b] = fp16_round(scale)
            m[b] = fp16_round(-the_min)
            inv[b] = iscale
            shift[b] = sh
        else:
            min_v, max_v, _ = _min_max(x, base, qk)
            scale = (max_v - min_v) / fnmax
            iscale = ONE / scale if scale != ZERO else ZERO
            d[b] = fp16_round(scale)
            m[b] = fp16_round(min_v)
            inv[b] = iscale
            shift[b] = min_v
            for j in range(qk):
                codes[base + j] = min(top, np.int32((xb[j] - min_v) * iscale + HALF))


@njit(parallel=True, cache=True, error_model="numpy")
def _fit_affine(x, qw, sigma2, nmax, qk, scratch_width, d, m, inv, shift, codes):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        weight = np.empty(qk, np.float32)
        scratch = np.empty((8, scratch_width), np.float32)
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_affine_row(x[r], qrow, weighted, sigma2[r], nmax, qk, d[r], m[r], inv[r], shift[r], codes[r],
                        weight, scratch)


# block_q4_1, 20 bytes:
#   byte  0       2       4                                               20
#         | d f16 | m f16 | qs[16]: qs[j] = code[j] | code[j+16] << 4        |
#   weight j = d * code[j] + m
# block_q5_1, 24 bytes:
#   byte  0       2       4                              8                               24
#         | d f16 | m f16 | qh u32 LE: bit j = code[j] >> 4 | qs[16]: low nibbles as Q4_1 |
#   weight j = d * code[j] + m
@njit(cache=True, error_model="numpy", inline="always")
def _pack_affine_block(out, o, nmax, d, m, lo_codes, hi_codes, half):
    _put_f16(out, o, d)
    _put_f16(out, o + 2, m)
    if nmax == 15:
        for j in range(half):
            out[o + 4 + j] = np.uint8((lo_codes[j] | (hi_codes[j] << 4)) & 0xFF)
    else:
        qh = np.int32(0)
        for j in range(half):
            lo = np.int32(lo_codes[j])
            hi = np.int32(hi_codes[j])
            out[o + 8 + j] = np.uint8(((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF)
            qh |= (((lo >> 4) & 1) << j) | (((hi >> 4) & 1) << (j + half))
        _put_u32(out, o + 4, qh)


@njit(cache=True, error_model="numpy")
def _pack_affine_row(codes, d, m, nmax, qk, out):
    type_size = 20 if nmax == 15 else 24
    half = qk // 2
    for b in range(d.shape[0]):
        base = b * qk
        _pack_affine_block(out, b * type_size, nmax, d[b], m[b], codes[base:base + half],
                           codes[base + half:base + qk], half)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_affine(codes, d, m, nmax, qk, out):
    for r in prange(d.shape[0]):
        _pack_affine_row(codes[r], d[r], m[r], nmax, qk, out[r])


@njit(cache=True, error_model="numpy")
def _quantize_affine_row(x, nmax, qk, out):
    """_fit_affine_row (no importance) + _pack_affine_row in one pass, written out in one function
    (the hot path of the cheapest formats); returns whether the row holds NaN/Inf."""
    half = qk // 2
    fnmax = F32(nmax)
    top = np.int32(nmax)
    type_size = 20 if nmax == 15 else 24
    bad = False
    for b in range(x.shape[0] // qk):
        base = b * qk
        kmin = np.int32(0x7FFFFFFF)
        kmax = np.int32(-0x7FFFFFFF - 1)
        for j in range(qk):
            k = order_key(x[base + j])
            kmin = min(kmin, k)
            kmax = max(kmax, k)
        bad |= (kmax > KEY_MAX_FINITE) | (kmin < KEY_MIN_FINITE)
        min_v = key_value(kmin)
        max_v = key_value(kmax)
        if min_v == ZERO:
            min_v = _first_zero(x, base, qk)
        if max_v == ZERO:
            max_v = _first_zero(x, base, qk)
        scale = (max_v - min_v) / fnmax
        iscale = ONE / scale if scale != ZERO else ZERO
        o = b * type_size
        _put_f16(out, o, scale)
        _put_f16(out, o + 2, min_v)
        if nmax == 15:
            for j in range(half):
                lo = min(top, np.int32((x[base + j] - min_v) * iscale + HALF))
                hi = min(top, np.int32((x[base + half + j] - min_v) * iscale + HALF))
                out[o + 4 + j] = np.uint8((lo | (hi << 4)) & 0xFF)
        else:
            qh = np.int32(0)
            for j in range(half):
                lo = min(top, np.int32((x[base + j] - min_v) * iscale + HALF))
                hi = min(top, np.int32((x[base + half + j] - min_v) * iscale + HALF))
                out[o + 8 + j] = np.uint8(((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF)
                qh |= (((lo >> 4) & 1) << j) | (((hi >> 4) & 1) << (j + half))
            _put_u32(out, o + 4, qh)
    return bad


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_affine(x, nmax, qk, out, nonfinite):
    for r in prange(x.shape[0]):
        nonfinite[r] = _quantize_affine_row(x[r], nmax, qk, out[r])


@njit(cache=True, error_model="numpy")
def _to_grid_affine_row(values, inv, shift, weighted, nmax, offset_cols, out):
    fnmax = F32(nmax)
    for c in range(values.shape[0]):
        b = (offset_cols + c) // QK
        if weighted:
            l = nearest_int_saturating(inv[b] * (values[c] - shift[b]))
            out[c] = max(0, min(nmax, l))
        else:
            t = (values[c] - shift[b]) * inv[b] + HALF
            if t <= ZERO:
                out[c] = 0
            elif t >= fnmax:
                out[c] = nmax
            else:
                out[c] = np.int32(t)


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_affine(values, inv, shift, weighted, nmax, offset_cols, out):
    for r in prange(values.shape[0]):
        _to_grid_affine_row(values[r], inv[r], shift[r], weighted, nmax, offset_cols, out[r])


class _Affine(BlockFormat):
    nmax: int
    params_type = AffineParams

    def _quantize_fused(self, x):
        out = np.empty((x.shape[0], x.shape[1] // QK * self.type_size), np.uint8)
        nonfinite = np.empty(x.shape[0], np.bool_)
        _quantize_affine(x, self.nmax, QK, out, nonfinite)
        return out, nonfinite

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        nb = n_cols // QK
        if qw.shape[0] and sigma2 is None:
            sigma2 = np.empty(n_rows, np.float32)
            _row_sigma2(x, sigma2)
        elif sigma2 is None:
            sigma2 = np.zeros(n_rows, np.float32)
        d, m, inv, shift = (np.empty((n_rows, nb), np.float32) for _ in range(4))
        codes = np.empty((n_rows, n_cols), np.uint8)
        _fit_affine(x, qw, sigma2, self.nmax, QK, SCRATCH_WIDTH, d, m, inv, shift, codes)
        return AffineParams(d=d, m=m, inv=inv, shift=shift, weighted=bool(qw.shape[0])), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_affine(codes, params.d, params.m, self.nmax, QK, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid_affine(values, params.inv, params.shift, params.weighted, self.nmax, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: (d * float32(code)) + m
        return (gather_columns(params.d, cols, QK) * codes.astype(np.float32)) + gather_columns(params.m, cols, QK)


class Q4_1(_Affine, qtype=GGMLQuantizationType.Q4_1):
    nmax = 15
    code_max = 15


class Q5_1(_Affine, qtype=GGMLQuantizationType.Q5_1):
    nmax = 31
    code_max = 31
