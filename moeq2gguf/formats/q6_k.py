"""Q6_K: 256-weight super-blocks of sixteen 16-weight sub-blocks with int8 scales under one fp16 d;
codes 0..63 (q + 32, q in -32..31).

ggml (quantize_row_q6_K_ref / _impl) runs make_qx_quants(nmax 32) per sub-block, weighted by x**2
without an importance vector and by the importance itself with one, then quantizes the sub-scales
against -128/max. A super-block whose sub-scales are all ~0 is written as all-zero bytes.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.k_common import QK_K, SignedScaleFormat
from moeq2gguf.formats.numerics import F32, GROUP_MAX_EPS, ONE, ZERO, f32_to_f16_bits, fp16_round, nearest_int
from moeq2gguf.formats.search import SCRATCH_WIDTH, make_qx_quants

_M128 = F32(-128.0)


@njit(cache=True, error_model="numpy")
def _fit_row(x, qrow, weighted, scratch_width, d, sc, codes, fallback):
    scales = np.empty(16, np.float32)
    scratch = np.empty((3, scratch_width), np.float32)
    for i in range(x.shape[0] // QK_K):
        base = i * QK_K
        xs = x[base:base + QK_K]
        L = codes[base:base + QK_K]
        max_scale = ZERO
        max_abs_scale = ZERO
        for ib in range(16):
            scale, _ = make_qx_quants(16, 32, xs[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16],
                                      qrow[base + 16 * ib:base + 16 * ib + 16] if weighted else xs[:0],
                                      weighted, scratch)
            scales[ib] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        if max_abs_scale < GROUP_MAX_EPS:
            # ggml zeroes the whole block: d = 0, scales = 0, every code 0
            d[i] = ZERO
            for ib in range(16):
                sc[i, ib] = 0
            for k in range(QK_K):
                L[k] = 0
                fallback[base + k] = 0
            continue
        iscale = _M128 / max_scale
        d[i] = fp16_round(ONE / iscale)
        for ib in range(16):
            sc[i, ib] = min(127, nearest_int(iscale * scales[ib]))
        for k in range(QK_K):
            fallback[base + k] = L[k]
        for j in range(16):
            dsub = d[i] * F32(sc[i, j])
            if dsub == ZERO:
                continue
            for ii in range(16):
                l = nearest_int(xs[16 * j + ii] / dsub)
                L[16 * j + ii] = 32 + max(-32, min(31, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _fit(x, qw, scratch_width, d, sc, codes, fallback):
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_row(x[r], qrow, weighted, scratch_width, d[r], sc[r], codes[r], fallback[r])


# block_q6_K, 210 bytes:
#   byte  0                                     128                                 192              208     210
#         | ql[128]: ql[64h+l]    = lo4(q[128h+l])    | qh[64]: qh[32h+l] bits 2k..2k+1 | scales[16] int8 | d f16 |
#         |            | lo4(q[128h+64+l]) << 4     |   = q[128h+32k+l] >> 4          |                 |       |
#         |          ql[64h+32+l] = same, +32 / +96   |   (k = 0..3)                    |                 |       |
#   weight e = d*scales[e/16]*(q[e] - 32)
@njit(cache=True, error_model="numpy")
def _pack_row(codes, d, sc, out):
    for i in range(d.shape[0]):
        o = i * 210
        q = codes[i * QK_K:(i + 1) * QK_K]
        for h in range(2):
            for l in range(32):
                e = 128 * h + l
                out[o + 64 * h + l] = (q[e] & 0xF) | ((q[e + 64] & 0xF) << 4)
                out[o + 64 * h + 32 + l] = (q[e + 32] & 0xF) | ((q[e + 96] & 0xF) << 4)
                out[o + 128 + 32 * h + l] = ((q[e] >> 4) | ((q[e + 32] >> 4) << 2) | ((q[e + 64] >> 4) << 4)
                                                | ((q[e + 96] >> 4) << 6))
        for j in range(16):
            out[o + 192 + j] = np.uint8(sc[i, j] & 0xFF)
        hd = f32_to_f16_bits(d[i])
        out[o + 208] = hd & 0xFF
        out[o + 209] = hd >> 8


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(codes, d, sc, out):
    for r in prange(d.shape[0]):
        _pack_row(codes[r], d[r], sc[r], out[r])


class Q6_K(SignedScaleFormat, qtype=GGMLQuantizationType.Q6_K):
    half = 32
    code_max = 63

    def _fit(self, x, qw, sigma2):
        p = self._new_params(*x.shape)
        codes = np.empty(x.shape, np.uint8)
        _fit(x, qw, SCRATCH_WIDTH, p.d, p.sc, codes, p.fallback)
        return p, codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack(codes, params.d, params.sc, out)
        return out
