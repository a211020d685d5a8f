"""Every format, with and without an importance vector, byte-identical to ggml_quantize_chunk on
1M-weight matrices of several distributions."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from format_checks import FORMAT_NAMES, assert_same_bytes
from moeq2gguf.formats import get_format, ggml_ref

DATASETS = ["normal", "student_t3", "sparse_outliers", "all_equal_rows", "zeros"]
N_THREADS = os.cpu_count() or 1


@pytest.mark.parametrize("weighted", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_bytes_match_ggml(name, dataset, weighted, datasets, importance):
    fmt = get_format(GGMLQuantizationType[name])
    x = datasets[dataset]
    imp = importance if weighted else None
    ours = fmt.quantize(x, imp)
    ref = ggml_ref.quantize(x, fmt.qtype, imp, n_threads=N_THREADS)
    assert ours.shape == (x.shape[0], x.shape[1] // fmt.block_size * fmt.type_size)
    assert_same_bytes(ours, ref, fmt.type_size, f"{name} {dataset} {'imatrix' if weighted else 'no imatrix'}")


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_per_row_importance_matches_ggml_row_by_row(name, datasets, importance):
    """A (R, C) importance (one vector per row, as for stacked experts) equals quantizing each row
    with its own imatrix."""
    fmt = get_format(GGMLQuantizationType[name])
    x = datasets["student_t3"][:8]
    rng = np.random.default_rng(5)
    per_row = (importance[None, :] * rng.uniform(0.1, 10.0, size=(8, 1))).astype(np.float32)
    per_row[3] = importance[::-1]
    ours = fmt.quantize(x, per_row)
    ref = np.concatenate([ggml_ref.quantize(x[r:r + 1], fmt.qtype, per_row[r]) for r in range(8)])
    assert_same_bytes(ours, ref, fmt.type_size, f"{name} per-row importance")


def test_mismatch_report_names_the_worst_block():
    from format_checks import mismatch_report
    a = np.zeros((2, 36), np.uint8)
    b = a.copy()
    b[1, 20] = 0b1011
    b[0, 1] = 1
    report = mismatch_report(a, b, 18)
    assert "2 of 4 blocks differ, 4 bits in all" in report
    assert "worst block row 1 block 1: 3 bits" in report
