"""IQ4_NL and IQ4_XS: 4-bit indices into the non-linear grid kvalues_iq4nl (-127 .. 113).

IQ4_NL: 32-weight blocks with one fp16 scale. IQ4_XS: 256-weight super-blocks with an fp16 d and a
6-bit signed scale per 32-weight sub-block. ggml_quantize_chunk runs quantize_row_iq4_nl_impl
with ntry = 7 in both cases; weights are x**2 without an importance vector, importance *
sqrt(sigma2 + x**2) with one (sigma2 = 2*mean(x**2) over the (super-)block).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, gather_columns
from moeq2gguf.formats.numerics import F32, ONE, ZERO, f32_to_f16_bits, fp16_round, nearest_int
from moeq2gguf.formats.search import IQ4_VALUES, SCRATCH_WIDTH, best_index_iq4, iq4_block_scale

NTRY = 7
_32 = F32(32.0)


@dataclasses.dataclass(frozen=True)
class IQ4NLParams(BlockParams):
    """d: (R, nb) float32 (fp16 value); inv: (R, nb) float32, 1/scale before fp16 rounding, the
    rule ggml picks indices with: code = nearest level to inv * x."""
    d: np.ndarray
    inv: np.ndarray


@dataclasses.dataclass(frozen=True)
class IQ4XSParams(BlockParams):
    """d: (R, nb) float32 (fp16 value); ls: (R, nb, 8) int8 sub-scales in -32..31 (weight =
    d*ls*level); inv: (R, nb, 8) float32, 1/(d_unrounded*ls), the index rule: nearest level to inv*x."""
    d: np.ndarray
    ls: np.ndarray
    inv: np.ndarray


@njit(cache=True, error_model="numpy", inline="always")
def _weights(xb, qrow, weighted, sigma2, out):
    for j in range(xb.shape[0]):
        if weighted:
            out[j] = qrow[j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            out[j] = xb[j] * xb[j]


@njit(cache=True, error_model="numpy")
def _fit_nl_row(x, qrow, weighted, d, inv, codes, weight, scratch):
    two_over_n = F32(2.0) / F32(32.0)
    for b in range(x.shape[0] // 32):
        base = b * 32
        xb = x[base:base + 32]
        sigma2 = ZERO
        for j in range(32):
            sigma2 += xb[j] * xb[j]
        sigma2 *= two_over_n
        _weights(xb, qrow[base:base + 32], weighted, sigma2, weight)
        scale = iq4_block_scale(32, xb, weight, NTRY, scratch)
        d[b] = fp16_round(scale)
        iscale = ONE / scale if scale != ZERO else ZERO
        inv[b] = iscale
        for j in range(32):
            codes[base + j] = best_index_iq4(iscale * xb[j])


@njit(parallel=True, cache=True, error_model="numpy")
def _fit_nl(x, qw, scratch_width, d, inv, codes):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0
    for r in prange(x.shape[0]):
        weight = np.empty(32, np.float32)
        scratch = np.empty((3, scratch_width), np.float32)
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_nl_row(x[r], qrow, weighted, d[r], inv[r], codes[r], weight, scratch)


@njit(cache=True, error_model="numpy")
def _fit_xs_row(x, qrow, weighted, d, ls, inv, codes, weight, scales, scratch):
    two_over_n = F32(2.0) / F32(256.0)
    for i in range(x.shape[0] // 256):
        base = i * 256
        xs = x[base:base + 256]
        sigma2 = ZERO
        for j in range(256):
            sigma2 += xs[j] * xs[j]
        sigma2 *= two_over_n
        max_scale = ZERO
        amax_scale = ZERO
        for ib in range(8):
            xb = xs[32 * ib:32 * ib + 32]
            _weights(xb, qrow[base + 32 * ib:base + 32 * ib + 32], weighted, sigma2, weight)
            scale = iq4_block_scale(32, xb, weight, NTRY, scratch)
            scales[ib] = scale
            if abs(scale) > amax_scale:
                amax_scale = abs(scale)
                max_scale = scale
        dd = -max_scale / _32
        d[i] = fp16_round(dd)
        idd = ONE / dd if dd != ZERO else ZERO
        for ib in range(8):
            l = max(-32, min(31, nearest_int(idd * scales[ib])))
            dl = dd * F32(l)
            idl = ONE / dl if dl != ZERO else ZERO
            ls[i, ib] = l
            inv[i, ib] = idl
            for j in range(32):
                codes[base + 32 * ib + j] = best_index_iq4(idl * xs[32 * ib + j])


@njit(parallel=True, cache=True, error_model="numpy")
def _fit_xs(x, qw, scratch_width, d, ls, inv, codes):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0
    for r in prange(x.shape[0]):
        weight = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        scratch = np.empty((3, scratch_width), np.float32)
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_xs_row(x[r], qrow, weighted, d[r], ls[r], inv[r], codes[r], weight, scales, scratch)


@njit(cache=True, error_model="numpy")
def _to_grid_nl_row(values, inv, offset, out):
    for c in range(values.shape[0]):
        out[c] = best_index_iq4(inv[(offset + c) // 32] * values[c])


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_nl(values, inv, offset, out):
    for r in prange(values.shape[0]):
        _to_grid_nl_row(values[r], inv[r], offset, out[r])


@njit(cache=True, error_model="numpy")
def _to_grid_xs_row(values, inv, offset, out):
    for c in range(values.shape[0]):
        col = offset + c
        out[c] = best_index_iq4(inv[col // 256, (col % 256) // 32] * values[c])


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_xs(values, inv, offset, out):
    for r in prange(values.shape[0]):
        _to_grid_xs_row(values[r], inv[r], offset, out[r])


@njit(cache=True, error_model="numpy", inline="always")
def _put_f16(out, o, value):
    h = f32_to_f16_bits(value)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


# block_iq4_nl, 18 bytes:
#   byte  0       2                                                  18
#         | d f16 | qs[16]: qs[j] = idx[j] | idx[j+16] << 4           |
#   weight j = d * kvalues_iq4nl[idx[j]]
@njit(cache=True, error_model="numpy")
def _pack_nl_row(codes, d, out):
    for b in range(d.shape[0]):
        o = b * 18
        c = b * 32
        _put_f16(out, o, d[b])
        for j in range(16):
            out[o + 2 + j] = codes[c + j] | (codes[c + j + 16] << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_nl(codes, d, out):
    for r in prange(d.shape[0]):
        _pack_nl_row(codes[r], d[r], out[r])


# block_iq4_xs, 136 bytes:
#   byte  0       2                            4                            8                                 136
#         | d f16 | scales_h u16 LE: bits 2ib.. | scales_l[4]: nibble ib%2 of | qs[128]: qs[16ib+j] =           |
#         |       |   2ib+1 = (ls[ib]+32) >> 4  |   byte ib/2 = (ls+32) & 15  |   idx[32ib+j] | idx[32ib+16+j]<<4 |
#   weight e = d * ls[e/32] * kvalues_iq4nl[idx[e]]
@njit(cache=True, error_model="numpy")
def _pack_xs_row(codes, d, ls, out):
    for i in range(d.shape[0]):
        o = i * 136
        _put_f16(out, o, d[i])
        scales_h = 0
        for k in range(4):
            out[o + 4 + k] = 0
        for ib in range(8):
            s = np.int64(ls[i, ib]) + 32
            out[o + 4 + ib // 2] |= (s & 0xF) << (4 * (ib % 2))
            scales_h |= (s >> 4) << (2 * ib)
            c = i * 256 + 32 * ib
            for j in range(16):
                out[o + 8 + 16 * ib + j] = codes[c + j] | (codes[c + 16 + j] << 4)
        out[o + 2] = scales_h & 0xFF
        out[o + 3] = (scales_h >> 8) & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_xs(codes, d, ls, out):
    for r in prange(d.shape[0]):
        _pack_xs_row(codes[r], d[r], ls[r], out[r])


class IQ4_NL(BlockFormat, qtype=GGMLQuantizationType.IQ4_NL):
    code_max = 15
    params_type = IQ4NLParams

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        d = np.empty((n_rows, n_cols // 32), np.float32)
        inv = np.empty_like(d)
        codes = np.empty(x.shape, np.uint8)
        _fit_nl(x, qw, SCRATCH_WIDTH, d, inv, codes)
        return IQ4NLParams(d=d, inv=inv), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_nl(codes, params.d, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid_nl(values, params.inv, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: d * float32(level)
        return gather_columns(params.d, cols, 32) * IQ4_VALUES[codes]


class IQ4_XS(BlockFormat, qtype=GGMLQuantizationType.IQ4_XS):
    code_max = 15
    params_type = IQ4XSParams

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        nb = n_cols // 256
        d = np.empty((n_rows, nb), np.float32)
        ls = np.empty((n_rows, nb, 8), np.int8)
        inv = np.empty((n_rows, nb, 8), np.float32)
        codes = np.empty(x.shape, np.uint8)
        _fit_xs(x, qw, SCRATCH_WIDTH, d, ls, inv, codes)
        return IQ4XSParams(d=d, ls=ls, inv=inv), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_xs(codes, params.d, params.ls, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid_xs(values, params.inv, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: (d * float32(ls)) * float32(level)
        scale = gather_columns(params.d, cols, 256) * gather_columns(params.ls, cols, 256, 32).astype(np.float32)
        return scale * IQ4_VALUES[codes]
