"""Q3_K: 256-weight super-blocks of sixteen 16-weight sub-blocks with 6-bit signed scales under one
fp16 d; codes 0..7 (q + 4, q in -4..3), split into 2 low bits and a high-bit mask.

Without an importance vector (quantize_row_q3_K_ref): make_q3_quants per sub-block, sub-scales
quantized against -32/max. With one (quantize_row_q3_K_impl): weights importance * sqrt(sigma2 +
x**2), sigma2 = 2*mean(x**2), make_qx_quants(nmax 4), then make_qx_quants(nmax 32) on the 16
sub-scales weighted by their sub-block weight sums.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.k_common import QK_K, SignedScaleFormat
from moeq2gguf.formats.numerics import F32, ONE, ZERO, f32_to_f16_bits, fp16_round, nearest_int
from moeq2gguf.formats.search import SCRATCH_WIDTH, make_q3_quants, make_qx_quants

_M32 = F32(-32.0)
_2 = F32(2.0)
_256 = F32(256.0)


# Q3_K scales[12]: sixteen 6-bit values s = sc + 32
#   byte  0..7 : s[j] & 15 (bits 0-3) | (s[j+8] & 15) << 4 (bits 4-7)
#   byte 8..11 : bits 2k..2k+1 of byte 8 + j%4 hold s[j] >> 4, with k = j/4
@njit(cache=True, error_model="numpy", inline="always")
def _encode_scales(stored, out):
    for k in range(12):
        out[k] = 0
    for j in range(16):
        l = stored[j]
        if j < 8:
            out[j] = l & 0xF
        else:
            out[j - 8] |= (l & 0xF) << 4
        out[8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def _decode_scale(scales, j):
    if j < 8:
        low = np.int64(scales[j]) & 0xF
    else:
        low = np.int64(scales[j - 8]) >> 4
    high = (np.int64(scales[8 + j % 4]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True, error_model="numpy")
def _fit_row(x, qrow, weighted, scratch_width, d, sc, codes, fallback):
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    ls = np.empty(16, np.uint8)
    signed = np.empty(16, np.int8)
    packed = np.empty(12, np.uint8)
    scratch = np.empty((3, scratch_width), np.float32)
    for i in range(x.shape[0] // QK_K):
        base = i * QK_K
        xs = x[base:base + QK_K]
        L = codes[base:base + QK_K]
        if weighted:
            sumx2 = ZERO
            for l in range(QK_K):
                sumx2 += xs[l] * xs[l]
            sigma2 = _2 * sumx2 / _256
            for j in range(16):
                for l in range(16):
                    v = xs[16 * j + l]
                    weights[l] = qrow[base + 16 * j + l] * np.sqrt(sigma2 + v * v)
                s = ZERO
                for l in range(16):
                    s += weights[l]
                sw[j] = s
                scale, _ = make_qx_quants(16, 4, xs[16 * j:16 * j + 16], L[16 * j:16 * j + 16], weights, True,
                                          scratch)
                scales[j] = scale
            d_block, _ = make_qx_quants(16, 32, scales, ls, sw, True, scratch)
            _encode_scales(ls, packed)
            d[i] = fp16_round(d_block)
        else:
            max_scale = ZERO
            amax = ZERO
            for j in range(16):
                scale = make_q3_quants(16, 4, xs[16 * j:16 * j + 16], signed)
                for l in range(16):
                    L[16 * j + l] = signed[l]
                scales[j] = scale
                if abs(scale) > amax:
                    amax = abs(scale)
                    max_scale = scale
            if max_scale != ZERO:
                iscale = _M32 / max_scale
                for j in range(16):
                    l = np.int8(nearest_int(iscale * scales[j]) & 0xFF)  # C stores it in an int8_t
                    ls[j] = max(-32, min(31, np.int64(l))) + 32
                _encode_scales(ls, packed)
                d[i] = fp16_round(ONE / iscale)
            else:
                for k in range(12):
                    packed[k] = 0
                d[i] = ZERO
        for j in range(16):
            sc[i, j] = _decode_scale(packed, j)
        for k in range(QK_K):
            fallback[base + k] = L[k]
        for j in range(16):
            dsub = d[i] * F32(sc[i, j])
            if dsub == ZERO:
                continue
            for ii in range(16):
                l = nearest_int(xs[16 * j + ii] / dsub)
                L[16 * j + ii] = 4 + max(-4, min(3, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _fit(x, qw, scratch_width, d, sc, codes, fallback):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_row(x[r], qrow, weighted, scratch_width, d[r], sc[r], codes[r], fallback[r])


# block_q3_K, 110 bytes:
#   byte  0                                32                                 96            108     110
#         | hmask[32]: bit k of hmask[l] = | qs[64]: qs[32h+l] bits 2k..2k+1 = | scales[12]  | d f16 |
#         |   q[32k + l] >= 4 (k = 0..7)   |   q[128h+32k+l] & 3  (as Q2_K)    | (6-bit, +32)|       |
#   weight e = d*(s[e/16] - 32)*((q & 3) - (hmask bit ? 0 : 4))
@njit(cache=True, error_model="numpy")
def _pack_row(codes, d, sc, out):
    stored = np.empty(16, np.uint8)
    packed = np.empty(12, np.uint8)
    for i in range(d.shape[0]):
        o = i * 110
        q = codes[i * QK_K:(i + 1) * QK_K]
        for l in range(32):
            m = 0
            for k in range(8):
                m |= (q[32 * k + l] >> 2) << k
            out[o + l] = m
        for h in range(2):
            for l in range(32):
                e = 128 * h + l
                out[o + 32 + 32 * h + l] = ((q[e] & 3) | ((q[e + 32] & 3) << 2) | ((q[e + 64] & 3) << 4)
                                               | ((q[e + 96] & 3) << 6))
        for j in range(16):
            stored[j] = sc[i, j] + 32
        _encode_scales(stored, packed)
        for k in range(12):
            out[o + 96 + k] = packed[k]
        hd = f32_to_f16_bits(d[i])
        out[o + 108] = hd & 0xFF
        out[o + 109] = hd >> 8


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(codes, d, sc, out):
    for r in prange(d.shape[0]):
        _pack_row(codes[r], d[r], sc[r], out[r])


class Q3_K(SignedScaleFormat, qtype=GGMLQuantizationType.Q3_K):
    half = 4
    code_max = 7

    def _fit(self, x, qw, sigma2):
        p = self._new_params(*x.shape)
        codes = np.empty(x.shape, np.uint8)
        _fit(x, qw, SCRATCH_WIDTH, p.d, p.sc, codes, p.fallback)
        return p, codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack(codes, params.d, params.sc, out)
        return out
