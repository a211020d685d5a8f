"""Helpers for the block-format tests: the shared data sets (256 x 4096, 1M weights each) and
byte-comparison reporting (XOR bit counts, worst block)."""
from __future__ import annotations

import numpy as np
import pytest

from moeq2gguf.formats import FORMATS

ROWS, COLS = 256, 4096
FORMAT_NAMES = [qtype.name for qtype in FORMATS]


def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    shape = (ROWS, COLS)
    # per-row magnitudes from 1e-5 to 10 so scales also land in fp16's subnormal range
    row_scale = (10.0 ** rng.uniform(-5, 1, size=(ROWS, 1))).astype(np.float32)
    normal = rng.standard_normal(shape).astype(np.float32) * row_scale
    student = (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
    outliers = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    hits = rng.random(shape) < 1e-3
    outliers[hits] *= 100 * rng.choice([-1, 1], size=hits.sum())
    outliers[::16, ::512] = 3.0  # one huge positive weight at the start of a few super-blocks
    equal = np.repeat(rng.choice([0.0, 1.0, -1.0, 0.02, -3e-4, 7.5, 1e-6], size=(ROWS, 1)), COLS, axis=1)
    equal = equal.astype(np.float32)
    zeros = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    zeros[rng.random(shape) < 0.5] = 0.0
    zeros[::8] = 0.0                            # whole zero rows
    zeros[1::8, :256] = 0.0                     # a zero super-block
    zeros[2::8, 32:48] = 0.0                    # a zero sub-block next to live ones
    zeros[3::8, 64:96] = 1e-20                  # below GROUP_MAX_EPS but not zero
    zeros[4::8, 256:512] = -0.0                 # negative zeros
    return {"normal": normal, "student_t3": student, "sparse_outliers": outliers,
            "all_equal_rows": equal, "zeros": zeros}


def make_datasets() -> dict[str, np.ndarray]:
    return _datasets()


def make_importance() -> np.ndarray:
    """An imatrix-like vector: log-normal over columns, a few dead (zero) columns."""
    rng = np.random.default_rng(99)
    imp = np.exp(rng.normal(0.0, 1.5, size=COLS)).astype(np.float32)
    imp[rng.choice(COLS, 40, replace=False)] = 0.0
    return imp


def mismatch_report(ours: np.ndarray, ref: np.ndarray, type_size: int) -> str:
    """XOR bit counts overall and of the worst block, with both blocks in hex."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    xor_bits = np.unpackbits((ours ^ ref)[..., None], axis=-1).sum(-1)
    per_block = xor_bits.reshape(ours.shape[0], -1, type_size).sum(-1)
    r, b = np.unravel_index(int(per_block.argmax()), per_block.shape)
    blk = slice(b * type_size, (b + 1) * type_size)
    return (f"{int((per_block > 0).sum())} of {per_block.size} blocks differ, {int(xor_bits.sum())} bits in all; "
            f"worst block row {r} block {b}: {int(per_block[r, b])} bits\n"
            f"  ours: {ours[r, blk].tobytes().hex()}\n  ggml: {ref[r, blk].tobytes().hex()}")


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str = "") -> None:
    if not np.array_equal(ours, ref):
        pytest.fail(f"{what}: bytes differ from the reference: {mismatch_report(ours, ref, type_size)}")
