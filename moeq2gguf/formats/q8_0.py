"""Q8_0: 32 weights, one fp16 scale, int8 codes (ggml quantize_row_q8_0_ref; the imatrix is ignored)."""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, gather_columns
from moeq2gguf.formats.numerics import (F32, ONE, ZERO, f32_as_i32, f32_to_f16_bits, fp16_round, i32_as_f32,
                                        round_away_int32)

QK = 32
_127 = F32(127.0)
_M128 = F32(-128.0)


@dataclasses.dataclass(frozen=True)
class Q8_0Params(BlockParams):
    """d: (R, nb) float32, the fp16 scale; inv: (R, nb) float32, the float32 1/d_unrounded that ggml
    rounds codes with (ggml rounds against the scale *before* its fp16 rounding)."""
    d: np.ndarray
    inv: np.ndarray


@njit(cache=True, error_model="numpy")
def _fit_row(x, qk, d, inv, codes):
    """One row: x (C,) -> d, inv (nb,), codes (C,) int8 (quantize_row_q8_0_ref)."""
    for b in range(x.shape[0] // qk):
        base = b * qk
        # max |x| as an integer max over the magnitude bits: exact, and it vectorizes
        top = np.int32(0)
        for j in range(qk):
            top = max(top, np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)))
        scale = i32_as_f32(top) / _127
        iscale = ONE / scale if scale != ZERO else ZERO
        d[b] = fp16_round(scale)
        inv[b] = iscale
        for j in range(qk):
            codes[base + j] = round_away_int32(x[base + j] * iscale)


@njit(parallel=True, cache=True, error_model="numpy")
def _fit(x, qk, d, inv, codes):
    for r in prange(x.shape[0]):
        _fit_row(x[r], qk, d[r], inv[r], codes[r])


@njit(cache=True, error_model="numpy")
def _quantize_row(x, qk, out):
    """_fit_row + _pack_row in one pass; returns whether the row holds NaN/Inf."""
    bad = False
    for b in range(x.shape[0] // qk):
        base = b * qk
        top = np.int32(0)
        for j in range(qk):
            top = max(top, np.int32(f32_as_i32(x[base + j]) & np.int32(0x7FFFFFFF)))
        bad |= top >= np.int32(0x7F800000)
        scale = i32_as_f32(top) / _127
        iscale = ONE / scale if scale != ZERO else ZERO
        o = b * 34
        h = f32_to_f16_bits(scale)
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(qk):
            out[o + 2 + j] = np.uint8(round_away_int32(x[base + j] * iscale) & np.int32(0xFF))
    return bad


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize(x, qk, out, nonfinite):
    # qk (= 32) comes in at run time: with a constant trip count LLVM unrolls the block loops
    # into scalar code instead of vectorizing them
    for r in prange(x.shape[0]):
        nonfinite[r] = _quantize_row(x[r], qk, out[r])


# block_q8_0, 34 bytes:
#   byte  0       2                                     34
#         | d f16 | qs[0..31] int8 (weight j = d*qs[j]) |
@njit(cache=True, error_model="numpy")
def _pack_row(codes, d, out):
    for b in range(d.shape[0]):
        o = b * 34
        h = f32_to_f16_bits(d[b])
        out[o] = h & 0xFF
        out[o + 1] = h >> 8
        for j in range(QK):
            out[o + 2 + j] = np.uint8(codes[b * QK + j] & 0xFF)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(codes, d, out):
    for r in prange(d.shape[0]):
        _pack_row(codes[r], d[r], out[r])


@njit(cache=True, error_model="numpy")
def _to_grid_row(values, inv, offset, out):
    for c in range(values.shape[0]):
        v = values[c] * inv[(offset + c) // QK]
        if v >= _127:
            out[c] = 127
        elif v <= _M128:
            out[c] = -128
        else:
            out[c] = round_away_int32(v)


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid(values, inv, offset, out):
    for r in prange(values.shape[0]):
        _to_grid_row(values[r], inv[r], offset, out[r])


class Q8_0(BlockFormat, qtype=GGMLQuantizationType.Q8_0):
    code_dtype = np.int8
    code_min, code_max = -128, 127
    params_type = Q8_0Params

    def _quantize_fused(self, x):
        out = np.empty((x.shape[0], x.shape[1] // QK * self.type_size), np.uint8)
        nonfinite = np.empty(x.shape[0], np.bool_)
        _quantize(x, QK, out, nonfinite)
        return out, nonfinite

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        nb = n_cols // QK
        d = np.empty((n_rows, nb), np.float32)
        inv = np.empty((n_rows, nb), np.float32)
        codes = np.empty((n_rows, n_cols), np.int8)
        _fit(x, QK, d, inv, codes)
        return Q8_0Params(d=d, inv=inv), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack(codes, params.d, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid(values, params.inv, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        return codes.astype(np.float32) * gather_columns(params.d, cols, QK)
