"""Scalar float32 helpers that reproduce ggml's C arithmetic bit for bit inside numba kernels.

ggml-quants.c computes in IEEE float32 (x86-64 SSE, no fused multiply-add, no reassociation), so
every helper here takes and returns float32 and every constant is a float32: a single float64
literal in an expression would silently promote the whole computation to double.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32

# float32 constants used by the kernels (module globals are frozen into the compiled code with
# their numpy type, so they stay float32).
ZERO = F32(0.0)
ONE = F32(1.0)
HALF = F32(0.5)
# ggml's GROUP_MAX_EPS: a group whose largest |x| is below it counts as all zero
GROUP_MAX_EPS = F32(1e-15)
# 1.5 * 2**23: adding it to |v| < 2**22 leaves round-half-even(v) in the low mantissa bits
_ROUND_MAGIC = F32(12582912.0)
_TWO_POW_24 = F32(16777216.0)
_TWO_POW_M24 = F32(2.0 ** -24)
# the largest argument for which the magic-number rounding is exact
NEAREST_INT_LIMIT = F32(4194303.0)


@intrinsic
def f32_as_i32(typingctx, value):
    """Reinterpret the bits of a float32 as an int32 (C's memcpy between float and int)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def i32_as_f32(typingctx, value):
    """Reinterpret the bits of an int32 as a float32."""
    if value != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, error_model="numpy")
def order_key(value):
    """float32 -> int32 with the same order (-0.0 just below +0.0, NaN outside +-inf), so that
    min/max reductions run on integers, which vectorize and are exact in any order."""
    bits = f32_as_i32(value)
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=True, error_model="numpy")
def key_value(key):
    """Inverse of order_key."""
    return i32_as_f32(np.int32(key ^ ((key >> np.int32(31)) & np.int32(0x7FFFFFFF))))


# order_key bounds of the finite floats: keys outside [KEY_MIN_FINITE, KEY_MAX_FINITE] are +-inf or NaN
KEY_MAX_FINITE = np.int32(0x7F7FFFFF)
KEY_MIN_FINITE = np.int32(-0x7F7FFFFF - 1)


@njit(cache=True, error_model="numpy")
def nearest_int(value):
    """ggml's nearest_int(float): round half to even via the 1.5 * 2**23 trick.

    Exact for |value| <= 4194303 (where it equals np.rint); beyond that it returns the same
    wrapped mantissa bits that ggml does, so out-of-range behaviour is mirrored too."""
    shifted = value + _ROUND_MAGIC
    bits = f32_as_i32(shifted)
    return np.int64((bits & 0x007FFFFF) - 0x00400000)


@njit(cache=True, error_model="numpy")
def nearest_int32(value):
    """nearest_int with int32 arithmetic throughout, so that loops over it vectorize (numba widens
    int32 binary operations to int64, and AVX2 has no int64 -> float32 conversion)."""
    shifted = value + _ROUND_MAGIC
    return np.int32((f32_as_i32(shifted) & np.int32(0x007FFFFF)) - np.int32(0x00400000))


@njit(cache=True, error_model="numpy")
def nearest_int_saturating(value):
    """nearest_int for arbitrary (e.g. GPTQ-updated) values: identical inside the exact range,
    saturated outside it instead of wrapping."""
    if value > NEAREST_INT_LIMIT:
        return np.int64(4194303)
    if value < -NEAREST_INT_LIMIT:
        return np.int64(-4194303)
    if value != value:  # NaN: the caller validated its input; keep the result defined anyway
        return np.int64(0)
    return nearest_int(value)


@njit(cache=True, error_model="numpy")
def round_away(value):
    """C roundf: round half away from zero, float32 in, int out (Q8_0 uses it)."""
    t = np.trunc(value)
    frac = value - t  # exact: t holds the leading bits of value
    if frac >= HALF:
        t += ONE
    elif frac <= -HALF:
        t -= ONE
    return np.int64(t)


@njit(cache=True, error_model="numpy")
def round_away_int32(value):
    """round_away with float32/int32 arithmetic only (vectorizes); |value| < 2**31."""
    t = np.trunc(value)
    frac = value - t
    t += ONE if frac >= HALF else ZERO
    t -= ONE if frac <= -HALF else ZERO
    return np.int32(t)


@njit(cache=True, error_model="numpy")
def f32_to_f16_bits(value):
    """float32 -> IEEE half bits with round-to-nearest-even (GGML_FP32_TO_FP16, numpy float16)."""
    bits = np.int64(f32_as_i32(value)) & 0xFFFFFFFF
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    if mag > 0x7F800000:       # NaN
        return np.uint16(sign | 0x7E00)
    if mag >= 0x47800000:      # >= 65536 or inf: overflows half
        return np.uint16(sign | 0x7C00)
    if mag < 0x38800000:       # below 2**-14: half subnormal, fixed quantum 2**-24
        # scaling by 2**24 is exact, np.rint rounds half to even
        return np.uint16(sign | np.int64(np.rint(abs(value) * _TWO_POW_24)))
    # normal half: round the 23-bit mantissa to 10 bits (half to even), then rebias 127 -> 15;
    # a carry out of the mantissa correctly bumps the exponent (up to inf at 65520)
    rounded = mag + 0x0FFF + ((mag >> 13) & 1)
    return np.uint16(sign | ((rounded >> 13) - (112 << 10)))


@njit(cache=True, error_model="numpy")
def f16_bits_to_f32(h):
    """IEEE half bits -> float32 (exact)."""
    h = np.int64(h)
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        magnitude = F32(mantissa) * _TWO_POW_M24
    elif exponent == 31:
        magnitude = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:
        magnitude = F32(mantissa | 0x400) * F32(2.0) ** F32(exponent - 25)
    return -magnitude if (h & 0x8000) else magnitude


@njit(cache=True, error_model="numpy")
def fp16_round(value):
    """The float32 value that a GGML_FP32_TO_FP16 / GGML_FP16_TO_FP32 round trip gives."""
    return f16_bits_to_f32(f32_to_f16_bits(value))
