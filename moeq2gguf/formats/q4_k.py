"""Q4_K and Q5_K: 256-weight super-blocks of eight 32-weight sub-blocks, each with a 6-bit scale
and a 6-bit min under fp16 super-scales d and dmin; codes 0..15 (Q4_K) or 0..31 (Q5_K).

Without an importance vector (quantize_row_q{4,5}_K_ref): per sub-block make_qkx2_quants with
weights av_x + |x| (av_x the sub-block's rms), then sub-scales quantized against max/63.
With one (quantize_row_q{4,5}_K_impl): weights importance * sqrt(sigma2 + x**2), sigma2 =
2*mean(x**2) over the super-block, make_qkx3_quants, then make_qp_quants for the sub-scales.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from moeq2gguf.formats.k_common import QK_K, ScaleMinFormat, decode_scale_min_k4, encode_scale_min_k4
from moeq2gguf.formats.numerics import F32, ZERO, f32_to_f16_bits, fp16_round, nearest_int
from moeq2gguf.formats.search import SCRATCH_WIDTH, make_qkx_quants, make_qp_quants

_63 = F32(63.0)
_32 = F32(32.0)
_2 = F32(2.0)
_256 = F32(256.0)
_QKX3_RMIN = F32(-0.9)
_QKX3_RDELTA = F32(0.05)


@njit(cache=True, error_model="numpy")
def _fit_row(x, qrow, weighted, nmax, rmin, rdelta, nstep, clamp_impl_scales, scratch_width, d, dmin, sc, mn, codes, fallback):
    weights = np.empty(32, np.float32)
    scratch = np.empty((8, scratch_width), np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sw = np.empty(8, np.float32)
    ls = np.empty(8, np.uint8)
    lm = np.empty(8, np.uint8)
    packed = np.empty(12, np.uint8)
    for i in range(x.shape[0] // QK_K):
        base = i * QK_K
        xs = x[base:base + QK_K]
        L = codes[base:base + QK_K]
        if weighted:
            sum_x2 = ZERO
            for l in range(QK_K):
                sum_x2 += xs[l] * xs[l]
            sigma2 = _2 * sum_x2 / _256
            for j in range(8):
                for l in range(32):
                    v = xs[32 * j + l]
                    weights[l] = qrow[base + 32 * j + l] * np.sqrt(sigma2 + v * v)
                sumw = ZERO
                for l in range(32):
                    sumw += weights[l]
                sw[j] = sumw
                scale, the_min, _, _ = make_qkx_quants(32, nmax, xs[32 * j:32 * j + 32], weights,
                                                       L[32 * j:32 * j + 32], _QKX3_RMIN, _QKX3_RDELTA,
                                                       36, False, scratch)
                scales[j] = scale
                mins[j] = the_min
            d_block = make_qp_quants(8, 63, scales, ls, sw)
            m_block = make_qp_quants(8, 63, mins, lm, sw)
            if clamp_impl_scales:  # Q5_K clamps to 63 here, Q4_K does not
                for j in range(8):
                    ls[j] = min(63, ls[j])
                    lm[j] = min(63, lm[j])
            d[i] = fp16_round(d_block)
            dmin[i] = fp16_round(m_block)
        else:
            max_scale = ZERO
            max_min = ZERO
            for j in range(8):
                sum_x2 = ZERO
                for l in range(32):
                    sum_x2 += xs[32 * j + l] * xs[32 * j + l]
                av_x = np.sqrt(sum_x2 / _32)
                for l in range(32):
                    weights[l] = av_x + abs(xs[32 * j + l])
                scale, the_min, _, _ = make_qkx_quants(32, nmax, xs[32 * j:32 * j + 32], weights,
                                                       L[32 * j:32 * j + 32], rmin, rdelta, nstep, False, scratch)
                scales[j] = scale
                mins[j] = the_min
                if scale > max_scale:
                    max_scale = scale
                if the_min > max_min:
                    max_min = the_min
            inv_scale = _63 / max_scale if max_scale > ZERO else ZERO
            inv_min = _63 / max_min if max_min > ZERO else ZERO
            for j in range(8):
                ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            d[i] = fp16_round(max_scale / _63)
            dmin[i] = fp16_round(max_min / _63)
        # what a reader of the packed bytes sees (identical to ls/lm unless a value exceeds 63)
        encode_scale_min_k4(ls, lm, packed)
        decode_scale_min_k4(packed, sc[i], mn[i])
        for k in range(QK_K):
            fallback[base + k] = L[k]
        for j in range(8):
            dsub = d[i] * F32(sc[i, j])
            if dsub == ZERO:
                continue
            dm = dmin[i] * F32(mn[i, j])
            for ii in range(32):
                l = nearest_int((xs[32 * j + ii] + dm) / dsub)
                L[32 * j + ii] = max(0, min(nmax, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _fit(x, qw, nmax, rmin, rdelta, nstep, clamp_impl_scales, scratch_width, d, dmin, sc, mn, codes, fallback):
    """x (R, C); qw (0|1|R, C); outputs d, dmin (R, nb), sc, mn (R, nb, 8), codes, fallback (R, C).
    rmin/rdelta/nstep: the make_qkx2_quants scan of the no-importance path."""
    weighted = qw.shape[0] > 0
    qstep = 1 if qw.shape[0] > 1 else 0  # per-row importance, or one vector for all rows
    for r in prange(x.shape[0]):
        qrow = qw[r * qstep] if weighted else x[r]
        _fit_row(x[r], qrow, weighted, nmax, rmin, rdelta, nstep, clamp_impl_scales, scratch_width, d[r], dmin[r],
                 sc[r], mn[r], codes[r], fallback[r])


@njit(cache=True, error_model="numpy", inline="always")
def _pack_header(out, o, d, dmin, sc, mn, packed):
    h = f32_to_f16_bits(d)
    out[o] = h & 0xFF
    out[o + 1] = h >> 8
    h = f32_to_f16_bits(dmin)
    out[o + 2] = h & 0xFF
    out[o + 3] = h >> 8
    encode_scale_min_k4(sc, mn, packed)
    for k in range(12):
        out[o + 4 + k] = packed[k]


# block_q4_K, 144 bytes:
#   byte  0       2          4              16                                             144
#         | d f16 | dmin f16 | scales[12]   | qs[128]: qs[32c+l] = q[64c+l] | q[64c+32+l]<<4 |
#   scales[12] = 6-bit (sc, mn) x 8, see k_common.encode_scale_min_k4
#   weight e = d*sc[e/32]*q[e] - dmin*mn[e/32]
@njit(cache=True, error_model="numpy")
def _pack_q4_k_row(codes, d, dmin, sc, mn, out):
    packed = np.empty(12, np.uint8)
    for i in range(d.shape[0]):
        o = i * 144
        _pack_header(out, o, d[i], dmin[i], sc[i], mn[i], packed)
        q = codes[i * QK_K:(i + 1) * QK_K]
        for c in range(4):
            for l in range(32):
                out[o + 16 + 32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_q4_k(codes, d, dmin, sc, mn, out):
    for r in prange(d.shape[0]):
        _pack_q4_k_row(codes[r], d[r], dmin[r], sc[r], mn[r], out[r])


# block_q5_K, 176 bytes:
#   byte  0       2          4              16                                   48           176
#         | d f16 | dmin f16 | scales[12]   | qh[32]: bit 2c / 2c+1 of qh[l] =   | qs[128] as  |
#         |       |          |              | q[64c+l] >> 4 / q[64c+32+l] >> 4   | Q4_K (low 4)|
#   weight e = d*sc[e/32]*q[e] - dmin*mn[e/32], q in 0..31
@njit(cache=True, error_model="numpy")
def _pack_q5_k_row(codes, d, dmin, sc, mn, out):
    packed = np.empty(12, np.uint8)
    for i in range(d.shape[0]):
        o = i * 176
        _pack_header(out, o, d[i], dmin[i], sc[i], mn[i], packed)
        q = codes[i * QK_K:(i + 1) * QK_K]
        for l in range(32):
            out[o + 16 + l] = 0
        for c in range(4):
            for l in range(32):
                lo = q[64 * c + l]
                hi = q[64 * c + 32 + l]
                out[o + 48 + 32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4)
                out[o + 16 + l] |= (((lo >> 4) & 1) << (2 * c)) | (((hi >> 4) & 1) << (2 * c + 1))


@njit(parallel=True, cache=True, error_model="numpy")
def _pack_q5_k(codes, d, dmin, sc, mn, out):
    for r in prange(d.shape[0]):
        _pack_q5_k_row(codes[r], d[r], dmin[r], sc[r], mn[r], out[r])


class Q4_K(ScaleMinFormat, qtype=GGMLQuantizationType.Q4_K):
    sub = 32
    nmax = 15
    code_max = 15

    def _fit(self, x, qw, sigma2):
        p = self._new_params(*x.shape)
        codes = np.empty(x.shape, np.uint8)
        _fit(x, qw, 15, F32(-1.0), F32(0.1), 20, False, SCRATCH_WIDTH, p.d, p.dmin, p.sc, p.mn, codes, p.fallback)
        return p, codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q4_k(codes, params.d, params.dmin, params.sc, params.mn, out)
        return out


class Q5_K(ScaleMinFormat, qtype=GGMLQuantizationType.Q5_K):
    sub = 32
    nmax = 31
    code_max = 31

    def _fit(self, x, qw, sigma2):
        p = self._new_params(*x.shape)
        codes = np.empty(x.shape, np.uint8)
        _fit(x, qw, 31, F32(-0.5), F32(0.1), 15, True, SCRATCH_WIDTH, p.d, p.dmin, p.sc, p.mn, codes, p.fallback)
        return p, codes

    def _pack(self, codes, params):
        out = np.empty((params.n_rows, params.n_blocks * self.type_size), np.uint8)
        _pack_q5_k(codes, params.d, params.dmin, params.sc, params.mn, out)
        return out
