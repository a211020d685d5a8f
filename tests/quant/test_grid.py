"""The K-quants' device-side rounding (quant/grid.py) equals the formats' numba rule bit for bit: codes and values,
for every column of a fitted block, on perturbed columns (what GPTQ feeds it), in sub-blocks whose stored scale is
zero (ggml's fallback codes) and far outside the grid (saturation)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moeq2gguf.quant.grid import FormatGrid

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_device_rounding_equals_the_format_rule(qtype):
    rng = np.random.default_rng(int(qtype))
    rows = 48
    w = rng.standard_t(4, size=(rows, 256)).astype(np.float32) * 0.05
    w[3, 32:64] = 0.0                       # a zero sub-block: stored scale 0, fallback codes
    w[5] = 0.0                              # an all-zero row
    w[7, :16] *= 1e-6                       # a nearly zero sub-block
    importance = rng.uniform(0.1, 2.0, size=(rows, 256)).astype(np.float32)
    grid = FormatGrid(qtype)
    grid.prepare(torch.from_numpy(w))
    params = grid.fit(torch.from_numpy(w), torch.from_numpy(importance))
    perturbed = [w, w + rng.normal(0, 0.02, size=w.shape).astype(np.float32),
                 w * np.float32(3.0), np.where(rng.random(w.shape) < 0.01, np.float32(3e7), w)]
    zero_scale = 0
    for x in perturbed:
        for j in range(256):
            column = torch.from_numpy(np.ascontiguousarray(x[:, j]))
            values, codes = grid.round(column, params, j)
            ref_values, ref_codes = grid._round(column, params, j)
            assert torch.equal(codes.to(torch.int32), ref_codes.to(torch.int32)), (qtype.name, j)
            assert torch.equal(values, ref_values), (qtype.name, j)
            zero_scale += int((grid._columns[1].dsub[:, j // grid._columns[1].sub] == 0).sum())
    assert zero_scale > 0   # the fallback branch ran
