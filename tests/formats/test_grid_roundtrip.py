"""The GPTQ path (fit_scales -> quantize_to_grid -> pack) against the RTN path (quantize), and
round trips between our reconstruction, gguf-py's dequantizer and ggml's own C dequantizer."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from format_checks import FORMAT_NAMES, assert_same_bytes
from moeq2gguf.formats import get_format, ggml_ref

BITS = np.uint32


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal including the sign of zeros and NaN payloads."""
    return a.shape == b.shape and np.array_equal(a.view(BITS), b.view(BITS))


@pytest.fixture(scope="module")
def mixed(datasets):
    """(240, 1024): 48 rows of each data set, so every special case meets every format."""
    return np.concatenate([x[:48, :1024] for x in datasets.values()])


@pytest.fixture(scope="module")
def mixed_importance(importance):
    return np.ascontiguousarray(importance[:1024])


@pytest.mark.parametrize("weighted", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_blockwise_fit_grid_pack_equals_quantize(name, weighted, mixed, mixed_importance):
    """What GPTQ does with a frozen grid (fit one block, round its columns, pack) reproduces
    quantize()'s bytes, i.e. ggml's, when no error is fed back."""
    fmt = get_format(GGMLQuantizationType[name])
    x = mixed
    imp = mixed_importance if weighted else None
    bs = fmt.block_size
    sigma2 = fmt.row_sigma2(x)  # the whole-row statistic the legacy formats weight blocks by
    blocks = []
    for b0 in range(0, x.shape[1], bs):
        params = fmt.fit_scales(x[:, b0:b0 + bs], None if imp is None else imp[b0:b0 + bs], sigma2=sigma2)
        assert params.n_rows == x.shape[0] and params.n_blocks == 1
        if b0 == 0:  # the first block one column at a time, as GPTQ walks it
            codes = np.concatenate([fmt.quantize_to_grid(x[:, b0 + j:b0 + j + 1], params, j) for j in range(bs)],
                                   axis=1)
            assert np.array_equal(codes, fmt.quantize_to_grid(x[:, b0:b0 + bs], params))
        else:
            codes = fmt.quantize_to_grid(x[:, b0:b0 + bs], params)
        assert codes.dtype == fmt.code_dtype
        blocks.append((codes, params))
    ref = fmt.quantize(x, imp)
    packed = np.concatenate([fmt.pack(codes, params) for codes, params in blocks], axis=1)
    assert_same_bytes(packed, ref, fmt.type_size, f"{name} blockwise GPTQ path")
    # or all blocks at once, with the per-block params joined
    joined = fmt.params_type.concat([params for _, params in blocks])
    assert joined.n_blocks == x.shape[1] // bs
    all_codes = np.concatenate([codes for codes, _ in blocks], axis=1)
    assert np.array_equal(fmt.pack(all_codes, joined), ref)
    assert np.array_equal(fmt.quantize_to_grid(x, joined), all_codes)


@pytest.mark.parametrize("weighted", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_dequantize_of_pack_equals_grid_values(name, weighted, mixed, mixed_importance):
    """dequantize(pack(codes, params)) == dequantize_codes(codes, params) bit for bit, for ggml's codes
    and for arbitrary codes, and gguf-py agrees with ggml's C dequantizer on those bytes."""
    fmt = get_format(GGMLQuantizationType[name])
    x = mixed
    params = fmt.fit_scales(x, mixed_importance if weighted else None)
    rng = np.random.default_rng(7)
    random_codes = rng.integers(fmt.code_min, fmt.code_max + 1, size=x.shape).astype(fmt.code_dtype)
    for codes in (fmt.quantize_to_grid(x, params), random_codes):
        packed = fmt.pack(codes, params)
        ours = fmt.dequantize_codes(codes, params)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        assert bitwise_equal(fmt.dequantize(packed), ours)
        assert bitwise_equal(ggml_ref.dequantize(packed, fmt.qtype), ours)
        # a column window gives the same values as the whole block
        assert bitwise_equal(fmt.dequantize_codes(codes[:, 5:17], params, 5), ours[:, 5:17])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_special_rows_round_trip(name):
    """Zero, constant and +-max rows: bytes equal ggml's, reconstruction equals the dequantizers."""
    fmt = get_format(GGMLQuantizationType[name])
    n = 512
    ramp = np.linspace(-1, 1, n, dtype=np.float32)
    rows = np.stack([
        np.zeros(n, np.float32),
        np.full(n, 0.25, np.float32),
        np.full(n, -3.0, np.float32),
        np.where(np.arange(n) % 2 == 0, 1000.0, -1000.0).astype(np.float32),   # +-max alternating
        np.where(np.arange(n) % 37 == 0, 60000.0, 0.001).astype(np.float32),   # near fp16 max
        ramp * 1e-6,                                                            # subnormal scales
        np.full(n, 1e-20, np.float32),                                          # below GROUP_MAX_EPS
        ramp,
    ])
    for imp in (None, np.linspace(0, 2, n, dtype=np.float32)):
        packed = fmt.quantize(rows, imp)
        assert_same_bytes(packed, ggml_ref.quantize(rows, fmt.qtype, imp), fmt.type_size, f"{name} special rows")
        params = fmt.fit_scales(rows, imp)
        codes = fmt.quantize_to_grid(rows, params)
        assert np.array_equal(fmt.pack(codes, params), packed)
        assert bitwise_equal(fmt.dequantize(packed), fmt.dequantize_codes(codes, params))
        assert bitwise_equal(ggml_ref.dequantize(packed, fmt.qtype), fmt.dequantize_codes(codes, params))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_grid_values_and_clamping(name, mixed):
    """grid_values lists each code's value; values far outside the grid get an end code; the
    rounded value of a weight is one of its grid values; column windows agree with whole blocks."""
    fmt = get_format(GGMLQuantizationType[name])
    x = mixed[::8, :512]
    params = fmt.fit_scales(x)
    grid = fmt.grid_values(params, 3, 40)
    assert grid.shape == (x.shape[0], 40, fmt.n_codes)
    k = 2
    assert bitwise_equal(grid[:, :, k], fmt.dequantize_codes(np.full((x.shape[0], 40), fmt.code_min + k,
                                                                      fmt.code_dtype), params, 3))
    rounded = fmt.round_to_grid(x[:, 3:43], params, 3)
    assert ((grid == rounded[:, :, None]).any(-1)).all()
    for scale in (1e6, -1e6, 1e30):
        codes = fmt.quantize_to_grid(x * np.float32(scale), params)
        assert codes.min() >= fmt.code_min and codes.max() <= fmt.code_max
    full = fmt.quantize_to_grid(x, params)
    assert np.array_equal(fmt.quantize_to_grid(x[:, 100:300], params, 100), full[:, 100:300])
    sub = params.select_rows([1, 3])
    assert np.array_equal(fmt.quantize_to_grid(x[[1, 3]], sub), full[[1, 3]])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_importance_uses_whole_row_sigma2(name, mixed, mixed_importance):
    """With an importance vector the 32-weight formats weight each block by the whole row's mean
    square: fitting one block needs sigma2 from the full row (row_sigma2) to match ggml."""
    fmt = get_format(GGMLQuantizationType[name])
    x = mixed[:, :256]
    imp = mixed_importance[:256]
    ref = fmt.quantize(x, imp)
    with_row = fmt.fit_scales(x[:, 32:64], imp[32:64], sigma2=fmt.row_sigma2(x))
    assert np.array_equal(fmt.pack(fmt.quantize_to_grid(x[:, 32:64], with_row), with_row), ref[:, fmt.type_size:2 * fmt.type_size])
    assert fmt.row_sigma2(x).dtype == np.float32
