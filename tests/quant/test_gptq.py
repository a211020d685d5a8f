"""GPTQ kernel properties on a simple reference grid (symmetric 4-bit, absmax scale per 32 columns)."""
from __future__ import annotations

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
