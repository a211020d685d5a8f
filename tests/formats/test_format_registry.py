"""The registry, the float32 helpers behind byte-exactness, and the ggml oracle binding."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from numba import njit

from moeq2gguf.formats import FORMATS, BlockFormat, get_format
from moeq2gguf.formats.numerics import f16_bits_to_f32, f32_to_f16_bits, nearest_int, nearest_int32, round_away

EXPECTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def test_registry_holds_every_format_with_gguf_sizes():
    assert [q.name for q in FORMATS] == EXPECTED
    for qtype, fmt in FORMATS.items():
        assert isinstance(fmt, BlockFormat) and fmt.qtype == qtype
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
        assert get_format(qtype) is fmt and get_format(int(qtype)) is fmt and get_format(qtype.name.lower()) is fmt
        assert fmt.n_codes == fmt.code_max - fmt.code_min + 1


def test_quantize_output_shape_and_dtype():
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float64)  # float64 in: ggml sees float32
    for fmt in FORMATS.values():
        out = fmt.quantize(x)
        assert out.dtype == np.uint8 and out.shape == (3, 512 // fmt.block_size * fmt.type_size)
        assert np.array_equal(out, fmt.quantize(x.astype(np.float32)))
        assert fmt.dequantize(out).shape == (3, 512)
        assert fmt.row_bytes(512) == out.shape[1]


@njit(cache=True)
def _apply(values, f16, back, near, near32, away):
    for i in range(values.size):
        f16[i] = f32_to_f16_bits(values[i])
        back[i] = f16_bits_to_f32(f16[i])
        if abs(values[i]) < 4e6:
            near[i] = nearest_int(values[i])
            near32[i] = nearest_int32(values[i])
            away[i] = round_away(values[i])


def test_float_helpers_match_numpy_and_c():
    """fp16 round-to-nearest-even (incl. subnormals, overflow, -0.0), round-half-even nearest_int,
    round-half-away roundf."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2 ** 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values)]
    special = np.array([0.0, -0.0, 65504, 65519.996, 65520, 1e6, 6.1035156e-05, 6.097555e-05, 2.9802322e-08,
                        2.9802326e-08, 5.9604645e-08, 1e-30, 0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 4194303.5],
                       np.float32)
    grid = np.arange(-2000, 2000, dtype=np.float32) / 4
    values = np.concatenate([values, special, -special, grid])
    n = values.size
    f16, back = np.empty(n, np.uint16), np.empty(n, np.float32)
    near, near32, away = np.zeros(n, np.int64), np.zeros(n, np.int32), np.zeros(n, np.int64)
    _apply(values, f16, back, near, near32, away)
    with np.errstate(over="ignore"):
        ref16 = values.astype(np.float16)
    assert np.array_equal(f16, ref16.view(np.uint16))
    assert np.array_equal(back.view(np.uint32), ref16.astype(np.float32).view(np.uint32))
    small = np.abs(values) < 4e6
    assert np.array_equal(near[small], np.rint(values[small]).astype(np.int64))
    assert np.array_equal(near32[small], near[small])
    exact = np.abs(values.astype(np.float64))
    expected_away = np.sign(values) * np.floor(exact + 0.5)
    assert np.array_equal(away[small], expected_away[small].astype(np.int64))


def test_ggml_oracle_rejects_bad_shapes():
    from moeq2gguf.formats import ggml_ref
    with pytest.raises(ValueError, match="not a multiple"):
        ggml_ref.quantize(np.zeros((1, 100), np.float32), GGMLQuantizationType.Q8_0)
    assert not ggml_ref.requires_imatrix(GGMLQuantizationType.IQ4_XS)


def test_small_calls_run_serially_and_restore_the_thread_count():
    import numba
    fmt = get_format(GGMLQuantizationType.Q4_K)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    params = fmt.fit_scales(weights=x)
    fmt.quantize_to_grid(x[:, :1], params)
    assert np.array_equal(fmt.quantize(x), fmt.pack(fmt.quantize_to_grid(x, params), params))
    assert numba.get_num_threads() == before
