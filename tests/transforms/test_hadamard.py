"""Hadamard matrices, the fast transform against the dense matrix, and the seeded rotations."""
from __future__ import annotations

import pytest
import torch

from moeq2gguf import Moeq2ggufError
from moeq2gguf.nn.hadamard import SMALL_ORDERS, fwht, hadamard_factors, hadamard_transform, small_hadamard
from moeq2gguf.transforms.rotate import random_rotation

F64 = torch.float64


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("m", [m for m in SMALL_ORDERS if m > 1])
def test_small_hadamard_orders(m):
    h = small_hadamard(m)
    assert h.shape == (m, m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=F64))


@pytest.mark.parametrize("n, factors", [(64, (1, 64)), (96, (12, 8)), (2880, None), (7168, (28, 256)),
                                        (3584, (28, 128)), (80, (20, 4)), (90, None), (12, (12, 1)), (6, None)])
def test_factors(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [2, 128, 256, 2048])
def test_fwht_equals_sylvester_matrix(n):
    x = torch.randn(5, 3, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fwht(x), x @ sylvester(n), rtol=0, atol=1e-10)


def test_fwht_large_order_against_parity_formula():
    """n = 2^15 (three passes of 2^5): row i of Sylvester's H is (-1)^popcount(i & j)."""
    n, rows = 1 << 15, torch.tensor([0, 1, 12345, (1 << 15) - 1])
    basis = torch.zeros(len(rows), n, dtype=F64)
    basis[torch.arange(len(rows)), rows] = 1.0
    j = torch.arange(n)
    parity = torch.zeros(len(rows), n, dtype=torch.int64)
    for bit in range(15):
        parity ^= ((rows[:, None] >> bit) & (j[None] >> bit) & 1)
    assert torch.equal(fwht(basis), 1.0 - 2.0 * parity.to(F64))


@pytest.mark.parametrize("n", [64, 96, 160, 224, 288, 320, 416, 480, 1792])
def test_fast_transform_equals_dense_kronecker(n):
    m, p = hadamard_factors(n)
    dense = torch.kron(small_hadamard(m), sylvester(p))
    x = torch.randn(4, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard_transform(x), x @ dense, rtol=0, atol=1e-9)
    assert torch.equal(dense @ dense.T, n * torch.eye(n, dtype=F64))


@pytest.mark.parametrize("n, kind", [(96, "hadamard"), (256, "hadamard"), (90, "orthogonal"), (64, "orthogonal")])
def test_rotations_are_orthogonal_and_seeded(n, kind):
    forced = kind if hadamard_factors(n) else None   # 64 with kind=orthogonal: the fallback on request
    rot = random_rotation(n, seed=7, kind=forced if kind == "orthogonal" else None)
    assert rot.kind == kind
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_rotation(n, 7, rot.kind).matrix())
    assert not torch.allclose(q, random_rotation(n, 8, rot.kind).matrix())
    if kind == "hadamard":   # diag(signs) H / sqrt(n): every entry +-1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=F64))
        m, p = hadamard_factors(n)
        signs = q[:, 0].sign() * torch.kron(small_hadamard(m), sylvester(p))[:, 0]
        assert torch.allclose(q, signs[:, None] * torch.kron(small_hadamard(m), sylvester(p)) / n ** 0.5)
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(1))     # float32 in, float32 out
    y = rot.apply(x)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), x.double() @ q, atol=1e-6)


def test_bad_seeds_and_orders_are_refused():
    for seed in ("3", 1.5, True, None):
        with pytest.raises(Moeq2ggufError, match="give a non-negative integer"):
            random_rotation(64, seed)
    with pytest.raises(Moeq2ggufError, match="out of range"):
        random_rotation(64, -1)
    with pytest.raises(Moeq2ggufError, match="no Hadamard matrix of order 90"):
        random_rotation(90, 0, "hadamard")
    with pytest.raises(Moeq2ggufError, match="unknown"):
        random_rotation(64, 0, "givens")
