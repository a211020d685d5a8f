"""Scale searches of ggml's quantizers (ggml/src/ggml-quants.c), re-implemented as numba functions.

Each function works on one group of weights (a 16- or 32-element sub-block, or the vector of a
super-block's sub-scales) and reproduces ggml's float32 arithmetic in the same operation order, so
that the chosen scales, and therefore the bytes, are identical. The searches return, besides the
scale, the inverse scale (and shift) that produced the returned codes: GPTQ needs that rule to
round further values against the same frozen scale.

Conventions: `x` and `weights` are float32 1-D views of length n; `codes` is an output view of the
caller's code buffer. All arithmetic is float32; integers enter products through F32(int).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from moeq2gguf.formats.numerics import F32, GROUP_MAX_EPS, ONE, ZERO, nearest_int

_TENTH = F32(0.1)

# the 16 non-linear IQ4 levels (kvalues_iq4nl), as float32 for the searches
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)


@njit(cache=True)
def make_qx_quants(n, nmax, x, codes, weights, use_weights):
    """Signed codes in [-nmax, nmax) with a least-squares scale (ggml make_qx_quants, rmse_type 1).

    Tries the absmax scale and 18 perturbations `-(nmax + 0.1*is)/max` (is = -9..9), keeps the one
    whose refitted scale explains the most weighted energy. Weights are `weights` if use_weights,
    else x**2. codes[i] = nmax + l (stored 0 .. 2*nmax-1), or 0 for an all-zero group.

    Returns (scale, iscale): the fitted scale, and the inverse scale the codes were rounded with
    (0 for an all-zero group)."""
    max_v = ZERO
    amax = ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_v = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            codes[i] = 0
        return ZERO, ZERO
    fnmax = F32(nmax)
    iscale = -fnmax / max_v
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        codes[i] = nmax + l
        w = weights[i] if use_weights else x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + _TENTH * F32(step)) / max_v
        sumlx = ZERO
        suml2 = ZERO
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = weights[i] if use_weights else x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                codes[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
            best_iscale = iscale
    return scale, best_iscale


@njit(cache=True)
def make_q3_quants(n, nmax, x, codes):
    """Q3_K's sub-block search without an imatrix (ggml make_q3_quants with do_rmse): absmax
    codes, then up to 5 sweeps of coordinate descent on the x**2-weighted least-squares fit.
    codes[i] = nmax + l. Returns the fitted scale (0 for an all-zero group)."""
    max_v = ZERO
    amax = ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_v = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            codes[i] = 0
        return ZERO
    iscale = -F32(nmax) / max_v
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        codes[i] = l
        w = x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = F32(codes[i])
            slx = sumlx - w * x[i] * fli
            if slx > ZERO:
                sl2 = suml2 - w * fli * fli
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != codes[i]:
                    fnl = F32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if sl2 > ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        codes[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        codes[i] += nmax
    return sumlx / suml2 if suml2 > ZERO else ZERO


@njit(cache=True)
def make_qkx_quants(n, nmax, x, weights, codes, aux, rmin, rdelta, nstep, use_mad):
    """Unsigned codes in [0, nmax] with a scale and a min (ggml make_qkx2_quants / make_qkx3_quants,
    which are the same search given explicit weights).

    Starts from the range fit, then scans nstep+1 inverse scales (rmin + rdelta*is + nmax)/(max-min);
    for each, solves the weighted 2x2 least squares for (scale, min) with min clamped to <= 0 and keeps
    the candidate with the lowest weighted absolute (use_mad) or squared error. As in ggml, each scan
    step rounds against the min of the best candidate so far.

    Returns (scale, the_min, iscale, shift): x ~ scale*code - the_min, and the codes were rounded as
    clamp(nearest_int(iscale * (x - shift)), 0, nmax)."""
    min_v = x[0]
    max_v = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_v:
            min_v = x[i]
        if x[i] > max_v:
            max_v = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if min_v > ZERO:
        min_v = ZERO
    if max_v == min_v:
        for i in range(n):
            codes[i] = 0
        return ZERO, -min_v, ZERO, ZERO
    fnmax = F32(nmax)
    iscale = fnmax / (max_v - min_v)
    scale = ONE / iscale
    best_iscale = iscale
    best_shift = min_v
    best_error = ZERO
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_v))
        l = max(0, min(nmax, l))
        codes[i] = l
        diff = scale * F32(l) + min_v - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (max_v - min_v)
        sum_l = ZERO
        sum_l2 = ZERO
        sum_xl = ZERO
        for i in range(n):
            l = nearest_int(iscale * (x[i] - min_v))
            l = max(0, min(nmax, l))
            aux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > ZERO:
                this_min = ZERO
                this_scale = sum_xl / sum_l2
            cur_error = ZERO
            for i in range(n):
                diff = this_scale * F32(aux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    codes[i] = aux[i]
                best_error = cur_error
                best_iscale = iscale
                best_shift = min_v
                scale = this_scale
                min_v = this_min
    return scale, -min_v, best_iscale, best_shift


@njit(cache=True)
def make_qp_quants(n, nmax, x, codes, weights):
    """Quantize n non-negative sub-scales (or mins) to integers in [0, nmax] with one float scale
    (ggml make_qp_quants): absmax start, 8 perturbed inverse scales scored by weighted squared
    error, then up to 5 sweeps of coordinate descent. `codes` is a uint8 buffer (C stores the codes
    as uint8 and later sums read them back as such). Returns the scale (0 for an all-zero vector)."""
    max_v = ZERO
    for i in range(n):
        max_v = max_v if max_v > x[i] else x[i]
    if max_v < GROUP_MAX_EPS:
        for i in range(n):
            codes[i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = fnmax / max_v
    for i in range(n):
        codes[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = ONE / iscale
    best_mse = ZERO
    for i in range(n):
        diff = x[i] - scale * F32(codes[i])
        best_mse += weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * F32(step) + fnmax) / max_v
        scale_is = ONE / iscale_is
        mse = ZERO
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F32(l)
            mse += weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        codes[i] = l & 0xFF
        w = weights[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = weights[i]
            fli = F32(codes[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > ZERO and sl2 > ZERO:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != codes[i]:
                    fnl = F32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        codes[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > ZERO else ZERO


@njit(cache=True)
def best_index_iq4(value):
    """Index of the IQ4 level nearest to value (ggml best_index_int8 on kvalues_iq4nl): bisection,
    ties towards the lower level."""
    if value <= IQ4_VALUES[0]:
        return 0
    if value >= IQ4_VALUES[15]:
        return 15
    lo = 0
    hi = 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if value < IQ4_VALUES[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if value - IQ4_VALUES[hi - 1] < IQ4_VALUES[hi] - value else hi


@njit(cache=True)
def iq4_block_scale(n, x, weights, ntry):
    """Scale of one IQ4 block (the per-block part of ggml quantize_row_iq4_nl_impl, ntry > 0):
    weighted least-squares scale for the levels chosen at d = max/127 and at 2*ntry+1 inverse
    scales (itry - 127)/max, keeping the best. Returns 0 when the block is all zero."""
    max_v = ZERO
    amax = ZERO
    for j in range(n):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            max_v = x[j]
    if amax < GROUP_MAX_EPS:
        return ZERO
    d = -max_v / IQ4_VALUES[0]
    inv = ONE / d
    sumqx = ZERO
    sumq2 = ZERO
    for j in range(n):
        q = IQ4_VALUES[best_index_iq4(inv * x[j])]
        w = weights[j]
        sumqx += w * q * x[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > ZERO else ZERO
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        inv = F32(itry - 127) / max_v
        sumqx = ZERO
        sumq2 = ZERO
        for j in range(n):
            q = IQ4_VALUES[best_index_iq4(inv * x[j])]
            w = weights[j]
            sumqx += w * q * x[j]
            sumq2 += w * q * q
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d
