"""GPTQ into the i-quant lattices (quant/lattice_grid.py, formats/iq_layout.py): the group fields read from ggml's bytes
decode to gguf-py's values and write back unchanged; the group search finds the cheapest representable 8 values (checked
against enumerating every sign pattern); the walk's packed bytes decode to exactly the weights it simulated and its
Hessian-weighted error is below ggml's importance-weighted search on the same Hessian's diagonal."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moeq2gguf.formats import iq_layout
from moeq2gguf.formats.lattice import LATTICE_TYPES, quantize_lattice
from moeq2gguf.quant.gptq import gptq_quantize
from moeq2gguf.quant.lattice_grid import LatticeGrid

TYPES = sorted(LATTICE_TYPES, key=lambda t: t.name)


def _bytes(qtype, x, imp):
    return quantize_lattice(qtype, x, imp).reshape(-1, iq_layout.layout(qtype).block_bytes)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_group_fields_decode_and_round_trip(qtype):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(4, 512)), rng.standard_t(2, size=(2, 512)), np.zeros((1, 512))]).astype(np.float32)
    blocks = _bytes(qtype, x, (rng.random(512) + 0.1).astype(np.float32))
    lay = iq_layout.layout(qtype)
    dl, delta = iq_layout.group_scales(qtype, blocks)
    idx, signs, neg_delta = iq_layout.read_groups(qtype, blocks)
    mags = lay.values[idx].reshape(len(blocks), 32, 8)
    if lay.signed:
        sign = np.where((signs[:, :, None] >> np.arange(8)) & 1, np.float32(-1), np.float32(1))
        values = dl[:, :, None] * mags * sign
    else:
        values = dl[:, :, None] * (mags + delta[:, :, None])
    assert np.array_equal(values.reshape(-1), gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(-1))
    if lay.parity:   # an even number of negatives in every group, as the implied 8th sign makes it
        assert (np.unpackbits(signs[..., None], axis=-1).sum(-1) % 2 == 0).all()
    scrambled = blocks.copy()
    iq_layout.write_groups(qtype, scrambled, (idx + 1) % len(lay.values), signs ^ 0x03, ~neg_delta)
    assert not np.array_equal(scrambled, blocks)
    iq_layout.write_groups(qtype, scrambled, idx, signs, neg_delta)
    assert np.array_equal(scrambled, blocks)


def _brute_force(lay, x, w, dl, delta):
    """The cheapest sum w (x - value)^2 over every representable group value, by enumeration."""
    n = x.shape[0]
    V = lay.values.astype(np.float64)
    if not lay.signed:
        deltas = (0.125, -0.125) if lay.delta_per_group else (None,)
        best = np.full(n, np.inf)
        for dd in deltas:
            dv = delta[:, None, None] if dd is None else dd
            vals = dl[:, None, None] * (V[None] + dv)                       # [n, C, 8]
            best = np.minimum(best, (w[:, None] * (x[:, None] - vals) ** 2).sum(-1).min(-1))
        return best
    patterns = np.arange(256)
    if lay.parity:
        patterns = patterns[np.array([bin(p).count("1") % 2 == 0 for p in patterns])]
    sign = np.where((patterns[:, None] >> np.arange(8)) & 1, -1.0, 1.0)    # [S, 8]
    best = np.full(n, np.inf)
    for s in sign:   # signs fixed: the parts are independent, each takes its cheapest entry
        total = np.zeros(n)
        for p in range(lay.parts):
            sl = slice(p * lay.dim, (p + 1) * lay.dim)
            vals = dl[:, None, None] * V[None] * s[sl]
            total += (w[:, None, sl] * (x[:, None, sl] - vals) ** 2).sum(-1).min(-1)
        best = np.minimum(best, total)
    return best


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_group_search_finds_the_cheapest_values(qtype):
    rng = np.random.default_rng(2)
    lay = iq_layout.layout(qtype)
    rows = 6
    x = rng.normal(size=(rows, 256)).astype(np.float32)
    grid = LatticeGrid(qtype)
    block = grid.fit(torch.from_numpy(x), torch.ones(rows, 256))
    g = 5
    xg = torch.from_numpy(x[:, 8 * g:8 * g + 8] * rng.uniform(0.5, 1.5, size=(rows, 8)).astype(np.float32))
    w = torch.from_numpy(rng.uniform(0.1, 3.0, size=(rows, 8)).astype(np.float32))
    values = grid.round_group(xg, w, block, 8 * g)
    got = (w.double() * (xg.double() - values.double()) ** 2).sum(-1).numpy()
    want = _brute_force(lay, xg.double().numpy(), w.double().numpy(), block.dl[:, g].double().numpy(),
                        block.delta[:, g].double().numpy())
    assert np.allclose(got, want, rtol=1e-5, atol=1e-9), (got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_walk_packs_what_it_simulated_and_beats_importance_only(qtype):
    torch.manual_seed(0)
    G, R, K, T = 2, 8, 256, 512
    X = torch.randn(G, T, K) * torch.linspace(0.2, 3, K)
    X[:, :, 1::2] += 0.8 * X[:, :, ::2]                   # correlated inputs: where error feedback pays
    H = torch.einsum("gtk,gtl->gkl", X, X) / T
    W = torch.randn(G, R, K) * 0.05
    grid = LatticeGrid(qtype)
    grid.prepare(W)
    Qw, _, params = gptq_quantize(W, H, grid)
    data = grid.pack(params)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(W.shape), Qw)
    base = torch.stack([torch.from_numpy(gguf.quants.dequantize(
        quantize_lattice(qtype, W[e].numpy(), H[e].diagonal().numpy().astype(np.float32)), qtype)).reshape(R, K)
        for e in range(G)])

    def error(q):
        d = (W - q).double()
        return float(torch.einsum("grk,gkl,grl->", d, H.double(), d))
    assert error(Qw) < 0.97 * error(base), (error(Qw), error(base))
