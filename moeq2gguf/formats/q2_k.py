"""Q2_K: 256-weight super-blocks of sixteen 16-weight sub-blocks, each with a 4-bit scale and a
4-bit min under fp16 d and dmin; codes 0..3.

Without an importance vector (quantize_row_q2_K_ref): make_qkx2_quants with |x| weights and mean
absolute error, sub-scales quantized against max/15. With one (quantize_row_q2_K_impl): weights
importance * sqrt(sigma2 + x**2), sigma2 = mean(x**2) over the super-block, make_qkx3_quants, then
make_qp_quants(nmax 15) for the sub-scales and sub-mins.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.k_common import QK_K, ScaleMinFormat
from moeq2gguf.formats.numerics import F32, ZERO, f32_to_f16_bits, fp16_round, nearest_int
from moeq2gguf.formats.search import SCRATCH_WIDTH, make_qkx_quants, make_qp_quants

_15 = F32(15.0)
_256 = F32(256.0)


@njit(cache=True, error_model="numpy")
def _fit_row(x, qrow, weighted, scratch_width, d, dmin, sc, mn, codes, fallback):
    weights = np.empty(16, np.float32)
    scratch = np.empty((8, scratch_width), np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    ls = np.empty(16, np.uint8)
    lm = np.empty(16, np.uint8)
    for i in range(x.shape[0] // QK_K):
        base = i * QK_K
        xs = x[base:base + QK_K]
        L = codes[base:base + QK_K]
        if weighted:
            sumx2 = ZERO
            for l in range(QK_K):
                sumx2 += xs[l] * xs[l]
            sigma2 = sumx2 / _256
            for j in range(16):
                for l in range(16):
                    v = xs[16 * j + l]
                    weights[l] = qrow[base + 16 * j + l] * np.sqrt(sigma2 + v * v)
                s = ZERO
                for l in range(16):
                    s += weights[l]
                sw[j] = s
                scale, the_min, _, _ = make_qkx_quants(16, 3, xs[16 * j:16 * j + 16], weights,
                                                       L[16 * j:16 * j + 16], F32(-0.9), F32(0.05), 36,
                                                       False, scratch)
                scales[j] = scale
                mins[j] = the_min
            dm = make_qp_quants(16, 15, scales, ls, sw)
            mm = make_qp_quants(16, 15, mins, lm, sw)
            d[i] = fp16_round(dm)
            dmin[i] = fp16_round(mm)
            for j in range(16):
                byte = (ls[j] | (lm[j] << 4)) & 0xFF
                sc[i, j] = byte & 0xF
                mn[i, j] = byte >> 4
        else:
            max_scale = ZERO
            max_min = ZERO
            for j in range(16):
                for l in range(16):
                    weights[l] = abs(xs[16 * j + l])
                scale, the_min, _, _ = make_qkx_quants(16, 3, xs[16 * j:16 * j + 16], weights,
                                                       L[16 * j:16 * j + 16], F32(-0.5), F32(0.1), 15,
                                                       True, scratch)
                scales[j] = scale
                mins[j] = the_min
                if scale > max_scale:
                    max_scale = scale
                if the_min > max_min:
                    max_min = the_min
            for j in range(16):
                ls[j] = 0
            if max_scale > ZERO:
                iscale = _15 / max_scale
                for j in range(16):
                    ls[j] = nearest_int(iscale * scales[j]) & 0xFF
                d[i] = fp16_round(max_scale / _15)
            else:
                d[i] = ZERO
            if max_min > ZERO:
                iscale = _15 / max_min
                for j in range(16):
                    ls[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
                dmin[i] = fp16_round(max_min / _15)
            else:
                dmin[i] = ZERO
            for j in range(16):
                sc[i, j] = ls[j] & 0xF
                mn[i, j] = ls[j] >> 4
        for k in range(QK_K):
            fallback[base + k] = L[k]
        for j in range(16):
            dsub = d[i] * F32(sc[i, j])
            if dsub == ZERO:
                continue
            dm = dmin[i] * F32(mn[i, j])
            for ii in range(16):
                l = nearest_int((xs[16 * j + ii] + dm) / dsub)
                L[16 * j + ii] = max(0, min(3, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _fit(x, qw, scratch_width, d, dmin, sc, mn, codes, fallback):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_row(x[r], qrow, weighted, scratch_width, d[r], dmin[r], sc[r], mn[r], codes[r], fallback[r])


# block_q2_K, 84 bytes:
#   byte  0                          16                                          80      82        84
#         | scales[16]: sc | mn << 4 | qs[64]: qs[32h+l] bits 2k..2k+1 =         | d f16 | dmin f16 |
#         |                          |   q[128h + 32k + l]  (h = 0,1; k = 0..3)  |       |          |
#   weight e = d*sc[e/16]*q[e] - dmin*mn[e/16]
@njit(cache=True, error_model="numpy")
def _pack_row(codes, d, dmin, sc, mn, out):
    for i in range(d.shape[0]):
        o = i * 84
        q = codes[i * QK_K:(i + 1) * QK_K]
        for j in range(16):
            out[o + j] = (sc[i, j] & 0xF) | ((mn[i, j] & 0xF) << 4)
        for h in range(2):
            for l in range(32):
                e = 128 * h + l
                out[o + 16 + 32 * h + l] = q[e] | (q[e + 32] << 2) | (q[e + 64] << 4) | (q[e + 96] << 6)
        hd = f32_to_f16_bits(d[i])
        out[o + 80] = hd & 0xFF
        out[o + 81] = hd >> 8
        hd = f32_to_f16_bits(dmin[i])
        out[o + 82] = hd & 0xFF
        out[o + 83] = hd >> 8


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(codes, d, dmin, sc, mn, out):
    for r in prange(d.shape[0]):
        _pack_row(codes[r], d[r], dmin[r], sc[r], mn[r], out[r])


class Q2_K(ScaleMinFormat, qtype=GGMLQuantizationType.Q2_K):
    sub = 16
    nmax = 3
    code_max = 3

    def _fit(self, x, qw, sigma2):
        p = self._new_params(*x.shape)
        codes = np.empty(x.shape, np.uint8)
        _fit(x, qw, SCRATCH_WIDTH, p.d, p.dmin, p.sc, p.mn, codes, p.fallback)
        return p, codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack(codes, params.d, params.dmin, params.sc, params.mn, out)
        return out
