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

from moeq2gguf.formats.numerics import F32, GROUP_MAX_EPS, ONE, ZERO, nearest_int, nearest_int32

_TENTH = F32(0.1)

# make_qx_quants tries the absmax scale plus 18 perturbations
QX_CANDIDATES = 19
# candidates are evaluated side by side in groups padded to a multiple of PAD (one AVX2 vector)
PAD = 8
# scratch columns the kernels allocate for the searches (>= the longest scan, 37 steps, padded);
# kernels receive it as a runtime argument so that LLVM vectorizes the loops over candidates
# instead of unrolling them
SCRATCH_WIDTH = 40

# the 16 non-linear IQ4 levels (kvalues_iq4nl), as float32 for the searches
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      dtype=np.float32)


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, codes, weights, use_weights, scratch):
    """Signed codes in [-nmax, nmax) with a least-squares scale (ggml make_qx_quants, rmse_type 1).

    Tries the absmax scale and 18 perturbations `-(nmax + 0.1*is)/max` (is = -9..9), keeps the one
    whose refitted scale explains the most weighted energy. Weights are `weights` if use_weights,
    else x**2. codes[i] = nmax + l (stored 0 .. 2*nmax-1), or 0 for an all-zero group.
    scratch: float32 (3, >= 19) work space.

    The 19 candidates are independent, so their sums are accumulated side by side (each in ggml's
    element order, so every sum is bit-identical) and compared in ggml's order afterwards; the inner
    loop over candidates then vectorizes.

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
    # loop bounds read from the scratch shape stay runtime values, so LLVM vectorizes the candidate
    # loops instead of unrolling them; padding to a multiple of 8 leaves no scalar remainder loop
    ncand = QX_CANDIDATES
    npad = min(scratch.shape[1], (ncand + PAD - 1) // PAD * PAD)
    iscales = scratch[0]
    sumlx = scratch[1]
    suml2 = scratch[2]
    fnmax = F32(nmax)
    iscales[0] = -fnmax / max_v
    k = 1
    for step in range(-9, 10):
        if step != 0:
            iscales[k] = -(fnmax + _TENTH * F32(step)) / max_v
            k += 1
    for k in range(ncand, npad):
        iscales[k] = ZERO
    for k in range(npad):
        sumlx[k] = ZERO
        suml2[k] = ZERO
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    for i in range(n):
        xi = x[i]
        w = weights[i] if use_weights else xi * xi
        wx = w * xi
        for k in range(npad):
            fl = F32(max(lo, min(hi, nearest_int32(iscales[k] * xi))))
            sumlx[k] += wx * fl
            suml2[k] += w * fl * fl
    scale = sumlx[0] / suml2[0] if suml2[0] != ZERO else ZERO
    best = scale * sumlx[0]
    best_k = 0
    for k in range(1, ncand):
        if suml2[k] > ZERO and sumlx[k] * sumlx[k] > best * suml2[k]:
            scale = sumlx[k] / suml2[k]
            best = scale * sumlx[k]
            best_k = k
    iscale = iscales[best_k]
    for i in range(n):
        codes[i] = nmax + max(lo, min(hi, nearest_int32(iscale * x[i])))
    return scale, iscale


@njit(cache=True, error_model="numpy")
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


@njit(cache=True, error_model="numpy")
def make_qkx_quants(n, nmax, x, weights, codes, rmin, rdelta, nstep, use_mad, scratch):
    """Unsigned codes in [0, nmax] with a scale and a min (ggml make_qkx2_quants / make_qkx3_quants,
    which are the same search given explicit weights).

    Starts from the range fit, then scans nstep+1 inverse scales (rmin + rdelta*is + nmax)/(max-min);
    for each, solves the weighted 2x2 least squares for (scale, min) with min clamped to <= 0 and keeps
    the candidate with the lowest weighted absolute (use_mad) or squared error. As in ggml, each scan
    step rounds against the min of the best candidate so far.
    scratch: float32 (8, >= nstep+1) work space.

    ggml walks the steps one by one; here the remaining steps are evaluated side by side (each sum
    in ggml's element order, so bit-identical), assuming the current min, and walked in ggml's order.
    A step that improves the fit and moves the min invalidates the later steps, which are then
    re-evaluated from the new min.

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
    lo = np.int32(0)
    hi = np.int32(nmax)
    fnmax = F32(nmax)
    iscale = fnmax / (max_v - min_v)
    scale = ONE / iscale
    best_iscale = iscale
    best_shift = min_v
    best_error = ZERO
    for i in range(n):
        l = max(lo, min(hi, nearest_int32(iscale * (x[i] - min_v))))
        diff = scale * F32(l) + min_v - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    iscales = scratch[0]
    sum_l = scratch[1]
    sum_l2 = scratch[2]
    sum_xl = scratch[3]
    det = scratch[4]
    this_scale = scratch[5]
    this_min = scratch[6]
    error = scratch[7]
    first = 0
    while first <= nstep:
        shift = min_v
        span = max_v - shift
        nc = nstep + 1 - first
        npad = min(scratch.shape[1], (nc + PAD - 1) // PAD * PAD)  # no scalar remainder loop
        for k in range(npad):
            iscales[k] = (rmin + rdelta * F32(first + k) + fnmax) / span
            sum_l[k] = ZERO
            sum_l2[k] = ZERO
            sum_xl[k] = ZERO
            error[k] = ZERO
        for i in range(n):
            xv = x[i]
            xs = xv - shift
            w = weights[i]
            for k in range(npad):
                fl = F32(max(lo, min(hi, nearest_int32(iscales[k] * xs))))
                wl = w * fl
                sum_l[k] += wl
                sum_l2[k] += wl * fl
                sum_xl[k] += wl * xv
        for k in range(npad):
            dk = sum_w * sum_l2[k] - sum_l[k] * sum_l[k]
            det[k] = dk
            ts = (sum_w * sum_xl[k] - sum_x * sum_l[k]) / dk
            tm = (sum_l2[k] * sum_x - sum_l[k] * sum_xl[k]) / dk
            if tm > ZERO:
                tm = ZERO
                ts = sum_xl[k] / sum_l2[k]
            this_scale[k] = ts
            this_min[k] = tm
        for i in range(n):
            xv = x[i]
            xs = xv - shift
            w = weights[i]
            for k in range(npad):
                fl = F32(max(lo, min(hi, nearest_int32(iscales[k] * xs))))
                diff = this_scale[k] * fl + this_min[k] - xv
                diff = abs(diff) if use_mad else diff * diff
                error[k] += w * diff
        next_first = nstep + 1
        for k in range(nc):
            if det[k] > ZERO and error[k] < best_error:
                best_error = error[k]
                best_iscale = iscales[k]
                best_shift = shift
                scale = this_scale[k]
                min_v = this_min[k]
                if min_v != shift:  # later steps round against the new min: re-evaluate them
                    next_first = first + k + 1
                    break
        first = next_first
    for i in range(n):
        codes[i] = max(lo, min(hi, nearest_int32(best_iscale * (x[i] - best_shift))))
    return scale, -min_v, best_iscale, best_shift


@njit(cache=True, error_model="numpy")
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


@njit(cache=True, error_model="numpy")
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


# IQ4 level steps: level k = -127 + sum of the first k steps (all integers, so exact in float32)
IQ4_STEPS = np.diff(IQ4_VALUES).astype(np.float32)


@njit(cache=True, error_model="numpy", inline="always")
def iq4_level(value):
    """The level best_index_iq4 picks, computed branch-free: level index = number of adjacent level
    pairs (v_j, v_j+1) with value - v_j >= v_j+1 - value (monotone in value, so this count is the
    bisection's answer, ties included). Vectorizes across candidates."""
    q = IQ4_VALUES[0]
    for j in range(15):
        if value - IQ4_VALUES[j] >= IQ4_VALUES[j + 1] - value:
            q += IQ4_STEPS[j]
    return q


@njit(cache=True, error_model="numpy")
def iq4_block_scale(n, x, weights, ntry, scratch):
    """Scale of one IQ4 block (the per-block part of ggml quantize_row_iq4_nl_impl, ntry > 0):
    weighted least-squares scale for the levels chosen at d = max/127 and at 2*ntry+1 inverse
    scales (itry - 127)/max, keeping the best. Returns 0 when the block is all zero.
    scratch: float32 (3, >= 2*ntry + 2). The candidates are evaluated side by side, each sum in
    ggml's order, and compared in ggml's order."""
    max_v = ZERO
    amax = ZERO
    for j in range(n):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            max_v = x[j]
    if amax < GROUP_MAX_EPS:
        return ZERO
    ncand = 2 * ntry + 2
    npad = min(scratch.shape[1], (ncand + PAD - 1) // PAD * PAD)
    inv = scratch[0]
    sumqx = scratch[1]
    sumq2 = scratch[2]
    inv[0] = ONE / (-max_v / IQ4_VALUES[0])
    for k in range(1, npad):
        inv[k] = F32(k - 1 - ntry - 127) / max_v
    for k in range(npad):
        sumqx[k] = ZERO
        sumq2[k] = ZERO
    for j in range(n):
        xj = x[j]
        w = weights[j]
        for k in range(npad):
            q = iq4_level(inv[k] * xj)
            wq = w * q
            sumqx[k] += wq * xj
            sumq2[k] += wq * q
    d = sumqx[0] / sumq2[0] if sumq2[0] > ZERO else ZERO
    best = d * sumqx[0]
    for k in range(1, ncand):
        if sumq2[k] > ZERO and sumqx[k] * sumqx[k] > best * sumq2[k]:
            d = sumqx[k] / sumq2[k]
            best = d * sumqx[k]
    return d
