"""The original 32-weight formats Q4_0, Q5_0 (symmetric) and Q4_1, Q5_1 (scale + min).

Without an importance vector ggml uses the `_ref` quantizers: absmax (or min/max) scale, codes by
truncating x/d + offset. With one it uses `quantize_row_qX_impl`: each block weighted by
importance * sqrt(sigma2 + x**2), sigma2 the mean square of the *whole row*, then make_qx_quants
(symmetric) or make_qkx3_quants (scale + min).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, _row_sigma2, gather_columns
from moeq2gguf.formats.numerics import (F32, HALF, ONE, ZERO, f32_to_f16_bits, fp16_round,
                                        nearest_int_saturating)
from moeq2gguf.formats.search import make_qkx_quants, make_qx_quants

QK = 32
_FLT_MAX = F32(np.finfo(np.float32).max)
_QKX3_RMIN = F32(-0.9)
_QKX3_RDELTA = F32(0.05)


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


@njit(parallel=True, cache=True)
def _fit_symmetric(x, qw, sigma2, nmax, d, inv, codes):
    n_rows, n_cols = x.shape
    fnmax = F32(nmax)
    offset = fnmax + HALF
    top = 2 * nmax - 1
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(n_rows):
        weight = np.empty(QK, np.float32)
        qr = r * qstep
        for b in range(n_cols // QK):
            base = b * QK
            xb = x[r, base:base + QK]
            if weighted:
                for j in range(QK):
                    weight[j] = qw[qr, base + j] * np.sqrt(sigma2[r] + xb[j] * xb[j])
                scale, iscale = make_qx_quants(QK, nmax, xb, codes[r, base:base + QK], weight, True)
                d[r, b] = fp16_round(scale)
                inv[r, b] = iscale
            else:
                amax = ZERO
                max_v = ZERO
                for j in range(QK):
                    if amax < abs(xb[j]):
                        amax = abs(xb[j])
                        max_v = xb[j]
                scale = max_v / -fnmax
                iscale = ONE / scale if scale != ZERO else ZERO
                d[r, b] = fp16_round(scale)
                inv[r, b] = iscale
                for j in range(QK):
                    codes[r, base + j] = min(top, np.int64(xb[j] * iscale + offset))


@njit(parallel=True, cache=True)
def _to_grid_symmetric(values, inv, weighted, nmax, offset_cols, out):
    n_rows, width = values.shape
    offset = F32(nmax) + HALF
    top = 2 * nmax - 1
    for r in prange(n_rows):
        for c in range(width):
            iscale = inv[r, (offset_cols + c) // QK]
            if weighted:
                if iscale == ZERO:
                    out[r, c] = 0
                else:
                    l = nearest_int_saturating(iscale * values[r, c])
                    out[r, c] = nmax + max(-nmax, min(nmax - 1, l))
            else:
                t = values[r, c] * iscale + offset
                if t <= ZERO:
                    out[r, c] = 0
                elif t >= F32(top):
                    out[r, c] = top
                else:
                    out[r, c] = np.int64(t)


# block_q4_0, 18 bytes:
#   byte  0       2                                                   18
#         | d f16 | qs[16]: qs[j] = code[j] | code[j+16] << 4            |
#   weight j = d * (code[j] - 8)
@njit(parallel=True, cache=True)
def _pack_q4_0(codes, d, out):
    n_rows, n_blocks = d.shape
    for r in prange(n_rows):
        for b in range(n_blocks):
            o = b * 18
            c = b * QK
            h = f32_to_f16_bits(d[r, b])
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            for j in range(16):
                out[r, o + 2 + j] = codes[r, c + j] | (codes[r, c + j + 16] << 4)


# block_q5_0, 22 bytes:
#   byte  0       2                              6                                        22
#         | d f16 | qh u32 LE: bit j = code[j] >> 4 | qs[16]: low nibbles as in Q4_0        |
#   weight j = d * (code[j] - 16)
@njit(parallel=True, cache=True)
def _pack_q5_0(codes, d, out):
    n_rows, n_blocks = d.shape
    for r in prange(n_rows):
        for b in range(n_blocks):
            o = b * 22
            c = b * QK
            h = f32_to_f16_bits(d[r, b])
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            qh = np.uint32(0)
            for j in range(16):
                lo = codes[r, c + j]
                hi = codes[r, c + j + 16]
                out[r, o + 6 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4)
                qh |= np.uint32((lo >> 4) & 1) << np.uint32(j)
                qh |= np.uint32((hi >> 4) & 1) << np.uint32(j + 16)
            for k in range(4):
                out[r, o + 2 + k] = (qh >> np.uint32(8 * k)) & np.uint32(0xFF)


class _Symmetric(BlockFormat):
    nmax: int
    params_type = SymmetricParams

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
        _fit_symmetric(x, qw, sigma2, self.nmax, d, inv, codes)
        return SymmetricParams(d=d, inv=inv, weighted=bool(qw.shape[0])), codes

    def _to_grid(self, values, params, offset, out):
        _to_grid_symmetric(values, params.inv, params.weighted, self.nmax, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: d * float32(code - n)
        return gather_columns(params.d, cols, QK) * (codes - self.nmax).astype(np.float32)


class Q4_0(_Symmetric, qtype=GGMLQuantizationType.Q4_0):
    nmax = 8
    code_max = 15

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q4_0(codes, params.d, out)
        return out


class Q5_0(_Symmetric, qtype=GGMLQuantizationType.Q5_0):
    nmax = 16
    code_max = 31

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q5_0(codes, params.d, out)
        return out


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


@njit(parallel=True, cache=True)
def _fit_affine(x, qw, sigma2, nmax, d, m, inv, shift, codes):
    n_rows, n_cols = x.shape
    fnmax = F32(nmax)
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(n_rows):
        weight = np.empty(QK, np.float32)
        aux = np.empty(QK, np.uint8)
        qr = r * qstep
        for b in range(n_cols // QK):
            base = b * QK
            xb = x[r, base:base + QK]
            if weighted:
                for j in range(QK):
                    weight[j] = qw[qr, base + j] * np.sqrt(sigma2[r] + xb[j] * xb[j])
                scale, the_min, iscale, sh = make_qkx_quants(QK, nmax, xb, weight, codes[r, base:base + QK], aux,
                                                             _QKX3_RMIN, _QKX3_RDELTA, 36, False)
                d[r, b] = fp16_round(scale)
                m[r, b] = fp16_round(-the_min)
                inv[r, b] = iscale
                shift[r, b] = sh
            else:
                min_v = _FLT_MAX
                max_v = -_FLT_MAX
                for j in range(QK):
                    if xb[j] < min_v:
                        min_v = xb[j]
                    if xb[j] > max_v:
                        max_v = xb[j]
                scale = (max_v - min_v) / fnmax
                iscale = ONE / scale if scale != ZERO else ZERO
                d[r, b] = fp16_round(scale)
                m[r, b] = fp16_round(min_v)
                inv[r, b] = iscale
                shift[r, b] = min_v
                for j in range(QK):
                    codes[r, base + j] = min(nmax, np.int64((xb[j] - min_v) * iscale + HALF))


@njit(parallel=True, cache=True)
def _to_grid_affine(values, inv, shift, weighted, nmax, offset_cols, out):
    n_rows, width = values.shape
    fnmax = F32(nmax)
    for r in prange(n_rows):
        for c in range(width):
            b = (offset_cols + c) // QK
            if weighted:
                l = nearest_int_saturating(inv[r, b] * (values[r, c] - shift[r, b]))
                out[r, c] = max(0, min(nmax, l))
            else:
                t = (values[r, c] - shift[r, b]) * inv[r, b] + HALF
                if t <= ZERO:
                    out[r, c] = 0
                elif t >= fnmax:
                    out[r, c] = nmax
                else:
                    out[r, c] = np.int64(t)


# block_q4_1, 20 bytes:
#   byte  0       2       4                                               20
#         | d f16 | m f16 | qs[16]: qs[j] = code[j] | code[j+16] << 4        |
#   weight j = d * code[j] + m
@njit(parallel=True, cache=True)
def _pack_q4_1(codes, d, m, out):
    n_rows, n_blocks = d.shape
    for r in prange(n_rows):
        for b in range(n_blocks):
            o = b * 20
            c = b * QK
            h = f32_to_f16_bits(d[r, b])
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            h = f32_to_f16_bits(m[r, b])
            out[r, o + 2] = h & 0xFF
            out[r, o + 3] = h >> 8
            for j in range(16):
                out[r, o + 4 + j] = codes[r, c + j] | (codes[r, c + j + 16] << 4)


# block_q5_1, 24 bytes:
#   byte  0       2       4                              8                               24
#         | d f16 | m f16 | qh u32 LE: bit j = code[j] >> 4 | qs[16]: low nibbles as Q4_1 |
#   weight j = d * code[j] + m
@njit(parallel=True, cache=True)
def _pack_q5_1(codes, d, m, out):
    n_rows, n_blocks = d.shape
    for r in prange(n_rows):
        for b in range(n_blocks):
            o = b * 24
            c = b * QK
            h = f32_to_f16_bits(d[r, b])
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            h = f32_to_f16_bits(m[r, b])
            out[r, o + 2] = h & 0xFF
            out[r, o + 3] = h >> 8
            qh = np.uint32(0)
            for j in range(16):
                lo = codes[r, c + j]
                hi = codes[r, c + j + 16]
                out[r, o + 8 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4)
                qh |= np.uint32((lo >> 4) & 1) << np.uint32(j)
                qh |= np.uint32((hi >> 4) & 1) << np.uint32(j + 16)
            for k in range(4):
                out[r, o + 4 + k] = (qh >> np.uint32(8 * k)) & np.uint32(0xFF)


class _Affine(BlockFormat):
    nmax: int
    params_type = AffineParams

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
        _fit_affine(x, qw, sigma2, self.nmax, d, m, inv, shift, codes)
        return AffineParams(d=d, m=m, inv=inv, shift=shift, weighted=bool(qw.shape[0])), codes

    def _to_grid(self, values, params, offset, out):
        _to_grid_affine(values, params.inv, params.shift, params.weighted, self.nmax, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: (d * float32(code)) + m
        return (gather_columns(params.d, cols, QK) * codes.astype(np.float32)) + gather_columns(params.m, cols, QK)


class Q4_1(_Affine, qtype=GGMLQuantizationType.Q4_1):
    nmax = 15
    code_max = 15

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q4_1(codes, params.d, params.m, out)
        return out


class Q5_1(_Affine, qtype=GGMLQuantizationType.Q5_1):
    nmax = 31
    code_max = 31

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q5_1(codes, params.d, params.m, out)
        return out
