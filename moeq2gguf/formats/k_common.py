"""What the 256-weight K-quants share: params, the rounding rule against frozen scales, and the
12-byte 6-bit scale/min codec of Q4_K and Q5_K.

ggml's K-quant quantizers all end the same way: with the super-block scale(s) rounded to fp16 and
the sub-block scales quantized, every weight is re-rounded against the *stored* sub-block scale,
except in sub-blocks whose stored scale is zero, which keep the codes of the search. Those codes
ride along in params as `fallback` so that GPTQ reproduces them (their value does not depend on
the code: the sub-block dequantizes to a constant).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit, prange

from moeq2gguf.formats.base import BlockFormat, BlockParams, gather_columns
from moeq2gguf.formats.numerics import F32, ZERO, nearest_int_saturating

QK_K = 256


@dataclasses.dataclass(frozen=True)
class ScaleMinParams(BlockParams):
    """Q2_K, Q4_K, Q5_K: weight = (d*sc) * code - (dmin*mn), per sub-block of `sub` weights.
    d, dmin: (R, nb) float32 (fp16 values); sc, mn: (R, nb, 256 // sub) uint8 quantized sub-scales
    and sub-mins; fallback: (R, nb * 256) uint8, ggml's codes where d*sc == 0."""
    d: np.ndarray
    dmin: np.ndarray
    sc: np.ndarray
    mn: np.ndarray
    fallback: np.ndarray


@dataclasses.dataclass(frozen=True)
class SignedScaleParams(BlockParams):
    """Q3_K, Q6_K: weight = (d*sc) * (code - half), per sub-block of 16 weights.
    d: (R, nb) float32 (fp16 value); sc: (R, nb, 16) int8 signed sub-scales;
    fallback: (R, nb * 256) uint8, ggml's codes where d*sc == 0."""
    d: np.ndarray
    sc: np.ndarray
    fallback: np.ndarray


@njit(cache=True, error_model="numpy")
def _to_grid_scale_min_row(values, d, dmin, sc, mn, fallback, sub, nmax, offset, out):
    for c in range(values.shape[0]):
        col = offset + c
        b = col // QK_K
        s = (col % QK_K) // sub
        dsub = d[b] * F32(sc[b, s])
        if dsub == ZERO:
            out[c] = fallback[col]
        else:
            dm = dmin[b] * F32(mn[b, s])
            l = nearest_int_saturating((values[c] + dm) / dsub)
            out[c] = max(0, min(nmax, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_scale_min(values, d, dmin, sc, mn, fallback, sub, nmax, offset, out):
    for r in prange(values.shape[0]):
        _to_grid_scale_min_row(values[r], d[r], dmin[r], sc[r], mn[r], fallback[r], sub, nmax, offset, out[r])


@njit(cache=True, error_model="numpy")
def _to_grid_signed_row(values, d, sc, fallback, half, offset, out):
    for c in range(values.shape[0]):
        col = offset + c
        b = col // QK_K
        dsub = d[b] * F32(sc[b, (col % QK_K) // 16])
        if dsub == ZERO:
            out[c] = fallback[col]
        else:
            l = nearest_int_saturating(values[c] / dsub)
            out[c] = half + max(-half, min(half - 1, l))


@njit(parallel=True, cache=True, error_model="numpy")
def _to_grid_signed(values, d, sc, fallback, half, offset, out):
    for r in prange(values.shape[0]):
        _to_grid_signed_row(values[r], d[r], sc[r], fallback[r], half, offset, out[r])


class ScaleMinFormat(BlockFormat):
    """Base of Q2_K / Q4_K / Q5_K (codes 0..nmax, sub-blocks of `sub` weights)."""
    sub: int
    nmax: int
    params_type = ScaleMinParams

    def _to_grid(self, values, params, offset, out):
        _to_grid_scale_min(values, params.d, params.dmin, params.sc, params.mn, params.fallback,
                           self.sub, self.nmax, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: (d * sc) * code - (dmin * mn), all float32
        scale = gather_columns(params.d, cols, QK_K) * gather_columns(params.sc, cols, QK_K, self.sub).astype(np.float32)
        offset = gather_columns(params.dmin, cols, QK_K) * gather_columns(params.mn, cols, QK_K, self.sub).astype(np.float32)
        return scale * codes.astype(np.float32) - offset

    def _new_params(self, n_rows: int, n_cols: int) -> ScaleMinParams:
        nb, ns = n_cols // QK_K, QK_K // self.sub
        return ScaleMinParams(d=np.empty((n_rows, nb), np.float32), dmin=np.empty((n_rows, nb), np.float32),
                              sc=np.empty((n_rows, nb, ns), np.uint8), mn=np.empty((n_rows, nb, ns), np.uint8),
                              fallback=np.empty((n_rows, n_cols), np.uint8))


class SignedScaleFormat(BlockFormat):
    """Base of Q3_K / Q6_K (codes 0..2*half-1 stored as q + half, sub-blocks of 16 weights)."""
    half: int
    params_type = SignedScaleParams

    def _to_grid(self, values, params, offset, out):
        _to_grid_signed(values, params.d, params.sc, params.fallback, self.half, offset, out)

    def _dequantize_codes(self, codes, params, cols):
        # gguf-py: (d * sc) * float32(code - half)
        scale = gather_columns(params.d, cols, QK_K) * gather_columns(params.sc, cols, QK_K, 16).astype(np.float32)
        return scale * (codes - self.half).astype(np.float32)

    def _new_params(self, n_rows: int, n_cols: int) -> SignedScaleParams:
        nb = n_cols // QK_K
        return SignedScaleParams(d=np.empty((n_rows, nb), np.float32), sc=np.empty((n_rows, nb, 16), np.int8),
                                 fallback=np.empty((n_rows, n_cols), np.uint8))


# Q4_K / Q5_K scales[12]: eight 6-bit (sc, mn) pairs
#   byte   0..3 : sc[j]   (bits 0-5) | sc[j+4] >> 4 (bits 6-7)         j = 0..3
#   byte   4..7 : mn[j]   (bits 0-5) | mn[j+4] >> 4 (bits 6-7)
#   byte  8..11 : sc[j+4] & 15 (bits 0-3) | (mn[j+4] & 15) << 4 (bits 4-7)
@njit(cache=True, error_model="numpy", inline="always")
def encode_scale_min_k4(ls, lm, out):
    """Pack 8 (scale, min) pairs, given as uint8 values as ggml holds them, into 12 bytes with
    ggml's byte operations (values above 63 spill exactly as they do in C)."""
    for j in range(8):  # j < 4 assigns bytes 0..7 before j >= 4 ORs the high bits into them
        if j < 4:
            out[j] = ls[j]
            out[j + 4] = lm[j]
        else:
            out[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            out[j - 4] |= ((ls[j] >> 4) << 6) & 0xFF
            out[j] |= ((lm[j] >> 4) << 6) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def decode_scale_min_k4(scales, sc, mn):
    """The 8 (scale, min) pairs a reader gets from the 12 bytes (ggml get_scale_min_k4)."""
    for j in range(8):
        if j < 4:
            sc[j] = scales[j] & 63
            mn[j] = scales[j + 4] & 63
        else:
            sc[j] = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)
            mn[j] = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)
