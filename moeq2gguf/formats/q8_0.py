"""Q8_0: 32 weights, one fp16 scale, int8 codes (ggml quantize_row_q8_0_ref; the imatrix is ignored)."""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, gather_columns
from moeq2gguf.formats.numerics import F32, ONE, ZERO, f32_to_f16_bits, fp16_round, round_away

QK = 32
_127 = F32(127.0)
_M128 = F32(-128.0)


@dataclasses.dataclass(frozen=True)
class Q8_0Params(BlockParams):
    """d: (R, nb) float32, the fp16 scale; inv: (R, nb) float32, the float32 1/d_unrounded that ggml
    rounds codes with (ggml rounds against the scale *before* its fp16 rounding)."""
    d: np.ndarray
    inv: np.ndarray


@njit(parallel=True, cache=True)
def _fit(x, d, inv, codes):
    n_rows, n_cols = x.shape
    for r in prange(n_rows):
        for b in range(n_cols // QK):
            base = b * QK
            amax = ZERO
            for j in range(QK):
                v = abs(x[r, base + j])
                amax = amax if amax > v else v
            scale = amax / _127
            iscale = ONE / scale if scale != ZERO else ZERO
            d[r, b] = fp16_round(scale)
            inv[r, b] = iscale
            for j in range(QK):
                codes[r, base + j] = round_away(x[r, base + j] * iscale)


# block_q8_0, 34 bytes:
#   byte  0      2                                   34
#         | d f16 | qs[0..31] int8 (weight j = d*qs[j]) |
@njit(parallel=True, cache=True)
def _pack(codes, d, out):
    n_rows, n_blocks = d.shape
    for r in prange(n_rows):
        for b in range(n_blocks):
            o = b * 34
            h = f32_to_f16_bits(d[r, b])
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            for j in range(QK):
                out[r, o + 2 + j] = np.uint8(codes[r, b * QK + j] & 0xFF)


@njit(parallel=True, cache=True)
def _to_grid(values, inv, offset, out):
    n_rows, width = values.shape
    for r in prange(n_rows):
        for c in range(width):
            v = values[r, c] * inv[r, (offset + c) // QK]
            if v >= _127:
                out[r, c] = 127
            elif v <= _M128:
                out[r, c] = -128
            else:
                out[r, c] = round_away(v)


class Q8_0(BlockFormat, qtype=GGMLQuantizationType.Q8_0):
    code_dtype = np.int8
    code_min, code_max = -128, 127
    params_type = Q8_0Params

    def _fit(self, x, qw, sigma2):
        n_rows, n_cols = x.shape
        nb = n_cols // QK
        d = np.empty((n_rows, nb), np.float32)
        inv = np.empty((n_rows, nb), np.float32)
        codes = np.empty((n_rows, n_cols), np.int8)
        _fit(x, d, inv, codes)
        return Q8_0Params(d=d, inv=inv), codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack(codes, params.d, out)
        return out

    def _to_grid(self, values, params, offset, out):
        _to_grid(values, params.inv, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        return codes.astype(np.float32) * gather_columns(params.d, cols, QK)
