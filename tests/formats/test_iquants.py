"""The i-quants ported so far (issue 23: IQ1_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): our quantizers write ggml's
bytes exactly on normal, heavy-tailed, sparse-outlier, all-equal, zero and tie-heavy rows, with an importance vector (and without one
where ggml allows it: IQ2_S and the IQ3s); gguf-py's dequantization of them equals ggml's, which also checks the search tables we derive
from the runtime's grids."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from moeq2gguf.formats import ggml_ref
from moeq2gguf.formats import iq1, iq3
from moeq2gguf.formats import iq2
from moeq2gguf.formats.iq2 import BLOCK_BYTES, XS_BLOCK_BYTES, quantize_iq2_xs, quantize_iq2_xxs

FORMATS = {"IQ2_XXS": (Q.IQ2_XXS, quantize_iq2_xxs, BLOCK_BYTES), "IQ2_XS": (Q.IQ2_XS, quantize_iq2_xs, XS_BLOCK_BYTES),
           "IQ3_XXS": (Q.IQ3_XXS, iq3.quantize_iq3_xxs, iq3.BLOCK_BYTES),
           "IQ3_S": (Q.IQ3_S, iq3.quantize_iq3_s, iq3.S_BLOCK_BYTES),
           "IQ2_S": (Q.IQ2_S, iq2.quantize_iq2_s, iq2.S_BLOCK_BYTES),
           "IQ1_S": (Q.IQ1_S, iq1.quantize_iq1_s, iq1.BLOCK_BYTES),
           "IQ1_M": (Q.IQ1_M, iq1.quantize_iq1_m, iq1.M_BLOCK_BYTES)}
WITHOUT_IMPORTANCE = ("IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M")   # ggml refuses the others without an importance matrix

R, C = 12, 512


def _rows(kind: str, rng) -> np.ndarray:
    if kind == "normal":
        x = rng.normal(size=(R, C))
    elif kind == "heavy-tailed":
        x = rng.standard_t(2, size=(R, C))
    elif kind == "sparse-outlier":
        x = rng.normal(size=(R, C)) * 0.01 + np.where(rng.random((R, C)) < 0.003, rng.normal(0, 50, (R, C)), 0)
    elif kind == "all-equal":
        x = np.full((R, C), -0.37)
    elif kind == "ties":   # many equal values: the IQ1 search sorts them (stably, as glibc's qsort of 32 pairs)
        x = rng.integers(-2, 3, size=(R, C)) * 0.25
    else:
        x = np.zeros((R, C))
    return x.astype(np.float32)


# "some-zero" (a fifth of the columns with importance 0) for the formats that need importance, "none" for the others
@pytest.mark.parametrize("name, importance", [(n, i) for n in sorted(FORMATS) for i in ("uniform", "some-zero", "none")
                                              if (i == "none") == (n in WITHOUT_IMPORTANCE) or i == "uniform"])
@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "sparse-outlier", "all-equal", "zero", "ties"])
def test_bytes_match_ggml(name, kind, importance):
    qtype, quantize, block_bytes = FORMATS[name]
    rng = np.random.default_rng(abs(hash((name, kind, importance))) % 2**32)
    rows = _rows(kind, rng)
    imp = None
    if importance != "none":
        imp = rng.uniform(0.05, 3.0, size=C) if importance == "uniform" else np.where(rng.random(C) < 0.2, 0.0, 1.0)
        imp = imp.astype(np.float32)
    ours = quantize(rows, imp)
    theirs = np.asarray(ggml_ref.quantize(rows, qtype, imp)).reshape(ours.shape)
    assert ours.shape == (R, C // 256 * block_bytes)
    assert [r for r in range(R) if not np.array_equal(ours[r], theirs[r])] == []
    import gguf.quants
    np.testing.assert_array_equal(gguf.quants.dequantize(ours, qtype).reshape(R, C),
                                  np.asarray(ggml_ref.dequantize(theirs, qtype)).reshape(R, C))


@pytest.mark.parametrize("name, points, dim, levels", [("IQ2_XXS", 256, 8, 3), ("IQ2_XS", 512, 8, 3), ("IQ2_S", 1024, 8, 3),
                                                        ("IQ1_S", 2048, 8, 3), ("IQ3_XXS", 256, 4, 8),
                                                        ("IQ3_S", 512, 4, 8)])
def test_tables_are_ggmls_shape(name, points, dim, levels):
    from moeq2gguf.formats.iq_grids import lattice_tables
    grid, kmap, neighbours = lattice_tables(name)
    assert grid.shape == (points, dim) and set(np.unique(grid)) <= set(range(1, 2 * levels, 2))
    assert (kmap >= 0).sum() == points and sorted(kmap[kmap >= 0]) == list(range(points))
    off = kmap[kmap < 0]
    counts = neighbours[-off - 1]
    assert counts.min() >= 1 and len(neighbours) == len(off) + counts.sum()


@pytest.mark.parametrize("name", sorted(set(FORMATS) - set(WITHOUT_IMPORTANCE)))
def test_importance_is_required(name):
    with pytest.raises(ValueError, match="needs an importance vector"):
        FORMATS[name][1](np.zeros((1, 256), np.float32), None)
