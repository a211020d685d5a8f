"""Hadamard matrices and the fast Walsh-Hadamard transform, for the residual rotation (rotate.py).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. We build orders n = 2^k * m with
m in SMALL_ORDERS (1 and the non-power-of-two orders that hidden sizes of MoE models need, e.g.
DeepSeek-V3's 7168 = 2^8 * 28, Qwen2-57B's 3584 = 2^7 * 28) as the Kronecker product
H_m (x) H_{2^k}: H_{2^k} is Sylvester's, applied with the fast transform (fwht), never as a
dense n x n matrix;
H_m is a small dense matrix from Paley's constructions over GF(q):
  - Paley I, q = 3 mod 4: H = I + [[0, 1^T], [-1, J]] of order q + 1 (12: q=11, 20: q=19, 60: q=59);
  - Paley II, q = 1 mod 4: C = [[0, 1^T], [1, J]], H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
    of order 2(q + 1) (28: q=13, 36: q=17, 52: q=25, the field of 25 elements);
  - 40 = 2 x 20 by Sylvester's doubling;
where J[a, b] = chi(a - b) is the Jacobsthal matrix of the quadratic character chi of GF(q)
(chi(0) = 0, 1 on nonzero squares, -1 otherwise).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

SMALL_ORDERS = (1, 12, 20, 28, 36, 40, 52, 60)
MAX_RADIX_BITS = 7   # fwht passes multiply by dense Sylvester factors of order <= 2^7
# order -> (construction, q)
_PALEY = {12: ("I", 11), 20: ("I", 19), 28: ("II", 13), 36: ("II", 17), 52: ("II", 25), 60: ("I", 59)}


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and m in SMALL_ORDERS (the smallest such m), or None."""
    for m in SMALL_ORDERS:
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def _field_elements(q: int) -> tuple[list[int], Callable[[int, int], int], Callable[[int, int], int]]:
    """GF(q), q = p or p^2 (p odd prime), as indices 0..q-1 with subtraction and multiplication.
    GF(p^2) = GF(p)[a]/(a^2 - r), r a non-square mod p: index x0 + p*x1 stands for x0 + x1*a."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    if p == q:
        return list(range(q)), lambda x, y: (x - y) % p, lambda x, y: x * y % p
    assert p * p == q, f"GF({q}) is not built here"
    r = next(v for v in range(2, p) if all(x * x % p != v for x in range(p)))

    def sub(x: int, y: int) -> int:
        return (x % p - y % p) % p + p * ((x // p - y // p) % p)

    def mul(x: int, y: int) -> int:
        a0, a1, b0, b1 = x % p, x // p, y % p, y // p
        return (a0 * b0 + r * a1 * b1) % p + p * ((a0 * b1 + a1 * b0) % p)

    return list(range(q)), sub, mul


def _jacobsthal(q: int) -> torch.Tensor:
    elements, sub, mul = _field_elements(q)
    squares = {mul(x, x) for x in elements if x != 0}
    chi = {x: (0 if x == 0 else 1 if x in squares else -1) for x in elements}
    return torch.tensor([[chi[sub(a, b)] for b in elements] for a in elements], dtype=torch.float64)


def _paley(kind: str, q: int) -> torch.Tensor:
    jac = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if kind == "I":   # q = 3 mod 4: J antisymmetric
        s = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([-ones, jac], 1)], 0)
        return s + torch.eye(q + 1, dtype=torch.float64)
    # q = 1 mod 4: J symmetric, C a symmetric conference matrix
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.T], 1), torch.cat([ones, jac], 1)], 0)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), torch.tensor([[1.0, -1.0], [-1.0, -1.0]],
                                                                                               dtype=torch.float64))


@functools.cache
def small_hadamard(m: int) -> torch.Tensor:
    """The dense Hadamard matrix H_m (float64, entries +-1) for m in SMALL_ORDERS."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 40:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), small_hadamard(20))
    if m not in _PALEY:
        raise ValueError(f"no Hadamard matrix of order {m} here; orders: {SMALL_ORDERS}")
    return _paley(*_PALEY[m])


@functools.cache
def sylvester(d: int) -> torch.Tensor:
    """Sylvester's H_d (float64, symmetric), d a power of two: H_2d = [[H_d, H_d], [H_d, -H_d]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_{2^k} over the last axis (Sylvester's H, unnormalised): the fast Walsh-Hadamard
    transform in radix-2^b form. Its k butterfly stages are grouped into ceil(k / MAX_RADIX_BITS)
    passes, using H_{2^k} = H_{2^b1} (x) H_{2^b2} (x) ...: each pass multiplies one axis of the row
    viewed as [2^b1, 2^b2, ...] by a dense H of order <= 128. Per row that is n * sum(2^bi)
    multiply-adds (n = 4096: 2 x 64 per element, against 4096 for a dense n x n product), in BLAS
    calls rather than k memory-bound butterfly passes: measured 5x faster than radix 2 on CPU."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, f"length {n} is not a power of two"
    k = n.bit_length() - 1
    passes = -(-k // MAX_RADIX_BITS)
    y, post = x.reshape(-1, n), n
    for i in range(passes):
        d = 1 << (k // passes + (i < k % passes))
        post //= d
        h = sylvester(d).to(x.dtype)
        # H is symmetric, so multiplying from the left along this axis is the same as x @ H there
        y = y.reshape(-1, d) @ h if post == 1 else torch.matmul(h, y.reshape(-1, d, post))
    assert post == 1
    return y.reshape(x.shape)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ (H_m (x) H_{2^k}) over the last axis, n = m * 2^k (unnormalised; divide by sqrt(n) for an
    orthogonal map). Rows viewed as X [m, 2^k]: x @ (A (x) B) = A^T X B, the dense m x m product on
    the small factor, the fast transform on the power of two."""
    n = x.shape[-1]
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} here: n must be 2^k times one of {SMALL_ORDERS}")
    m, p = factors
    y = x.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("rip,ik->rkp", y, small_hadamard(m).to(x.dtype))
    return fwht(y).reshape(x.shape)


# the expert Hadamard (transforms/expert_hadamard.py): blockwise on the expert intermediate activation
CHUNK_ELEMENTS = 1 << 22


def hadamard_matrix(block: int) -> torch.Tensor:
    """H_b, orthonormal, Sylvester's order (float64): what ggml_gen_hadamard builds."""
    return fwht(torch.eye(block, dtype=torch.float64)) / math.sqrt(block)


def apply_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] -> x @ diag(H_b, ..., H_b), computed in float64, returned in x's dtype."""
    n = x.shape[-1]
    assert n % block == 0, f"Hadamard block {block} does not divide {n}"
    rows = x.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // n)
    for i in range(0, rows.shape[0], step):
        chunk = rows[i:i + step].to(torch.float64)
        out[i:i + step] = (fwht(chunk.reshape(-1, n // block, block)) / math.sqrt(block)).reshape(chunk.shape)
    return out.reshape(x.shape)
