"""User errors name the value, the rule and the fix."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from format_checks import FORMAT_NAMES
from moeq2gguf.formats import get_format


def test_row_size_not_a_multiple_of_the_block():
    fmt = get_format(GGMLQuantizationType.Q4_K)
    with pytest.raises(ValueError, match=r"row size 1000 is not a multiple of Q4_K block size 256; use Q8_0 or pad"):
        fmt.quantize(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match=r"row size 48 is not a multiple of Q4_0 block size 32; pad the rows"):
        get_format(GGMLQuantizationType.Q4_0).quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match="row size 300 is not a multiple of IQ4_XS block size 256"):
        get_format(GGMLQuantizationType.IQ4_XS).fit_scales(np.zeros((1, 300), np.float32))


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("importance", [False, True])
def test_nonfinite_weights_are_named(name, bad, importance):
    fmt = get_format(GGMLQuantizationType[name])
    x = np.ones((3, 512), np.float32)
    x[2, 300] = bad
    imp = np.ones(512, np.float32) if importance else None
    with pytest.raises(ValueError, match=rf"rows\[2, 300\] is {bad}; {name} quantization needs finite weights; "
                                         "fix the checkpoint or replace NaN/Inf"):
        fmt.quantize(x, imp)
    with pytest.raises(ValueError, match=r"weights\[2, 300\]"):
        fmt.fit_scales(x, imp)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "IQ4_NL"])
def test_importance_wrong_length(name):
    fmt = get_format(GGMLQuantizationType[name])
    x = np.ones((2, 512), np.float32)
    with pytest.raises(ValueError, match=r"importance length 256 does not match row size 512; pass one value per column"):
        fmt.quantize(x, np.ones(256, np.float32))
    with pytest.raises(ValueError, match=r"importance shape \(3, 512\) matches neither"):
        fmt.quantize(x, np.ones((3, 512), np.float32))


@pytest.mark.parametrize("bad, rule", [(-1.0, "negative; importance must be >= 0"),
                                       (np.nan, "importance must be finite and >= 0"),
                                       (np.inf, "importance must be finite and >= 0")])
def test_importance_bad_entries(bad, rule):
    fmt = get_format(GGMLQuantizationType.Q4_K)
    imp = np.ones(256, np.float32)
    imp[17] = bad
    with pytest.raises(ValueError, match=rf"importance\[17\] is {bad}.*{rule}"):
        fmt.quantize(np.ones((1, 256), np.float32), imp)
    with pytest.raises(ValueError, match=rf"importance\[1, 17\] is {bad}.*{rule}"):
        fmt.quantize(np.ones((2, 256), np.float32), np.stack([np.ones(256, np.float32), imp]))


def test_shape_and_dtype_errors():
    fmt = get_format(GGMLQuantizationType.Q6_K)
    with pytest.raises(ValueError, match="must be 2-D"):
        fmt.quantize(np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="is not a float type"):
        fmt.quantize(np.zeros((1, 256), np.int32))
    with pytest.raises(ValueError, match="uint8"):
        fmt.dequantize(np.zeros((1, 210), np.float32))


def test_grid_argument_errors():
    fmt = get_format(GGMLQuantizationType.Q4_K)
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    params = fmt.fit_scales(x)
    with pytest.raises(ValueError, match=r"columns 250..257 fall outside the 256 columns"):
        fmt.quantize_to_grid(x[:, :8], params, 250)
    with pytest.raises(ValueError, match=r"one row per params row"):
        fmt.quantize_to_grid(x[:3], params)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\], got \[0, 16\]"):
        fmt.pack(np.full((4, 256), 16, np.uint8) * (np.arange(256) % 2), params)
    with pytest.raises(ValueError, match=r"codes shape \(4, 128\) does not match params"):
        fmt.pack(np.zeros((4, 128), np.uint8), params)
    with pytest.raises(ValueError, match=r"sigma2 shape \(3,\) must be \(4,\)"):
        get_format(GGMLQuantizationType.Q4_0).fit_scales(x, np.ones(256, np.float32), sigma2=np.ones(3, np.float32))


def test_unknown_format():
    with pytest.raises(ValueError, match=r"has no block format here; supported formats are Q4_0, Q4_1, .*IQ4_XS"):
        get_format(GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(ValueError, match="has no block format"):
        get_format("Q7_K")
