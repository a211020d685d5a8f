"""GPTQ kernel properties on a simple reference grid (symmetric 4-bit, absmax scale per 32 columns)."""
from __future__ import annotations

import pytest
import torch

from moeq2gguf.quant.gptq import GPTQConfig, gptq_quantize


class AbsmaxInt4:
    group = 32

    def fit(self, w, importance):
        return w.abs().amax(-1).clamp_min(1e-12) / 7

    def round(self, column, scale, j):
        code = torch.clamp(torch.round(column / scale), -8, 7)
        return code * scale, code.to(torch.int32)


def rtn(W):
    G, R, K = W.shape
    blocks = W.reshape(G * R, K // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).view(G, R, K)


def correlated_inputs(G, T, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(G, K, K, generator=gen) / K ** 0.5 + torch.eye(K)
    X = torch.randn(G, T, K, generator=gen) @ mix
    X[..., :4] *= 10  # outlier channels, as trained models have
    return X


def recon_error(W, Q, X):
    return float(((X @ (W - Q).transpose(1, 2)) ** 2).sum())


def test_identity_hessian_equals_rtn():
    W = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(1))
    H = torch.eye(512).expand(2, 512, 512).contiguous()
    Q, _, params = gptq_quantize(W, H, AbsmaxInt4())
    assert torch.equal(Q, rtn(W))
    assert len(params) == 512 // 32


def test_error_below_rtn_and_batched_equals_loop():
    G, R, K, T = 3, 24, 256, 2048
    W = torch.randn(G, R, K, generator=torch.Generator().manual_seed(2))
    X = correlated_inputs(G, T, K)
    H = X.transpose(1, 2) @ X / T
    Q, _, _ = gptq_quantize(W, H, AbsmaxInt4())
    for g in range(G):
        e_gptq = recon_error(W[g:g + 1], Q[g:g + 1], X[g:g + 1])
        e_rtn = recon_error(W[g:g + 1], rtn(W[g:g + 1]), X[g:g + 1])
        assert e_gptq < 0.8 * e_rtn, (g, e_gptq, e_rtn)
        Qg, _, _ = gptq_quantize(W[g:g + 1], H[g:g + 1], AbsmaxInt4())
        assert torch.allclose(Qg, Q[g:g + 1], atol=1e-5)


def test_lazy_block_size_does_not_change_result():
    W = torch.randn(1, 8, 512, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(1, 1024, 512, seed=3)
    H = X.transpose(1, 2) @ X / 1024
    Q256, _, _ = gptq_quantize(W, H, AbsmaxInt4(), GPTQConfig(lazy_block=256))
    Q512, _, _ = gptq_quantize(W, H, AbsmaxInt4(), GPTQConfig(lazy_block=512))
    # the same algorithm: only float reassociation differs (scales by an ulp, a rare rounding tie)
    assert (~torch.isclose(Q256, Q512, rtol=1e-5, atol=1e-6)).float().mean() < 1e-3
    assert abs(recon_error(W, Q256, X) / recon_error(W, Q512, X) - 1) < 1e-4


def test_dead_input_columns_do_not_break_cholesky():
    W = torch.randn(1, 8, 256)
    X = torch.randn(1, 512, 256)
    X[..., 100:110] = 0
    H = X.transpose(1, 2) @ X
    Q, _, _ = gptq_quantize(W, H, AbsmaxInt4())
    assert torch.isfinite(Q).all()


def test_reconstruction_error_is_the_output_error():
    """tensor_quant.reconstruction_error (float32 products, float64 sum) equals ||X (W - Q)^T||^2 / T in float64."""
    from moeq2gguf.quant.tensor_quant import reconstruction_error
    G, R, K, T = 3, 64, 512, 700
    X = correlated_inputs(G, T, K, seed=3).to(torch.float64)
    W = torch.randn(G, R, K, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    Q = rtn(W)
    H = (X.transpose(1, 2) @ X / T).to(torch.float32)
    direct = float(((X @ (W - Q).transpose(1, 2)) ** 2).sum()) / T
    got = reconstruction_error(W.to(torch.float32), Q.to(torch.float32), H)
    assert abs(got / direct - 1) < 1e-5, (got, direct)
    assert reconstruction_error(W[0].to(torch.float32), Q[0].to(torch.float32), H[:1]) < got   # a matrix: one group


def test_inverse_factor_in_chunks_is_the_same(monkeypatch):
    """The inverse-Hessian factor taken a few experts at a time (bounded float64 temporaries) equals one batch."""
    from moeq2gguf.quant import gptq
    X = correlated_inputs(5, 300, 64, seed=5)
    H = X.transpose(1, 2) @ X / 300
    H[2] = 0   # an expert that saw nothing
    whole = gptq.inverse_hessian_factor(H, 0.01)
    monkeypatch.setattr(gptq, "FACTOR_CHUNK_BYTES", 2 * 8 * 64 * 64)   # two experts per chunk
    assert torch.equal(gptq.inverse_hessian_factor(H, 0.01), whole)


def row_major_walk(W, H, grid, cfg=GPTQConfig()):
    """The walk as first written, on [G, R, B] slices (a column strided by B): the reference for the column-major one."""
    from moeq2gguf.quant.gptq import group_weights, inverse_hessian_factor
    G, R, K = W.shape
    U = inverse_hessian_factor(H, cfg.damp)
    importance = H.diagonal(dim1=-2, dim2=-1).to(torch.float32)
    W = W.to(torch.float32).clone()
    Q = torch.empty_like(W)
    B, vector, chosen = min(cfg.lazy_block, K), getattr(grid, "vector", 1), None
    inner = min(32, grid.group, B)
    for b0 in range(0, K, B):
        b1 = min(b0 + B, K)
        W1, U1 = W[:, :, b0:b1].clone(), U[:, b0:b1, b0:b1]
        Err = torch.zeros_like(W1)
        for i0 in range(0, b1 - b0, inner):
            i1 = min(i0 + inner, b1 - b0)
            for j in range(i0, i1):
                col, jj = b0 + j, (b0 + j) % grid.group
                if jj == 0:
                    imp = importance[:, None, col:col + grid.group].expand(G, R, grid.group).reshape(G * R, grid.group)
                    params = grid.fit(W1[:, :, j:j + grid.group].reshape(G * R, grid.group), imp)
                w = W1[:, :, j]
                if vector > 1:
                    if jj % vector == 0:
                        weights = group_weights(U1[:, j:j + vector, j:j + vector])[:, None, :].expand(G, R, vector)
                        chosen = grid.round_group(W1[:, :, j:j + vector].reshape(G * R, vector),
                                                  weights.reshape(G * R, vector), params, jj).view(G, R, vector)
                    q = chosen[:, :, jj % vector]
                else:
                    q = grid.round(w.reshape(G * R), params, jj)[0].view(G, R)
                Q[:, :, col] = q
                err = (w - q) / U1[:, j, j][:, None]
                W1[:, :, j + 1:i1] -= err[:, :, None] * U1[:, None, j, j + 1:i1]
                Err[:, :, j] = err
            W1[:, :, i1:] -= Err[:, :, i0:i1] @ U1[:, i0:i1, i1:]
        W[:, :, b1:] -= Err @ U[:, b0:b1, b1:]
    return Q


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "IQ2_XXS"])
def test_column_major_walk_equals_the_row_major_one(qtype):
    """quant/gptq walks each lazy block column-major for speed: the weights equal, bit for bit, those of the walk on
    [G, R, B] slices, for K-quants, a legacy format and an i-quant lattice (two lazy blocks, several experts)."""
    import gguf
    from moeq2gguf.formats.lattice import is_lattice
    from moeq2gguf.quant.grid import FormatGrid
    from moeq2gguf.quant.lattice_grid import LatticeGrid
    q = gguf.GGMLQuantizationType[qtype]
    X = correlated_inputs(3, 700, 512, seed=7)
    H = X.transpose(1, 2) @ X / 700
    W = torch.randn(3, 24, 512, generator=torch.Generator().manual_seed(8))
    grids = [LatticeGrid(q) if is_lattice(q) else FormatGrid(q) for _ in range(2)]
    for g in grids:
        g.prepare(W)
    assert torch.equal(gptq_quantize(W, H, grids[0])[0], row_major_walk(W, H, grids[1]))
