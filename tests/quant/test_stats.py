"""Hessian statistics: affinity weighting and the coverage fallback (docs/METHODS.md sections 3-4)."""
from __future__ import annotations

import torch

from moeq2gguf.quant.stats import StatsCollector


def test_affinity_weighting_and_coverage_rules():
    K = 8
    gen = torch.Generator().manual_seed(0)
    collector = StatsCollector(n_experts=3, affinity=True, full=True)
    x0 = torch.randn(20, K, generator=gen)        # expert 0: 20 tokens >= K -> its own Hessian
    a0 = torch.rand(20, generator=gen)
    x1 = torch.randn(3, K, generator=gen)         # expert 1: 3 tokens < K -> blended with the pool
    a1 = torch.rand(3, generator=gen)
    collector.observe("exps_in", x0, a0, 0)
    collector.observe("exps_in", x1, a1, 1)       # expert 2: never routed -> pooled
    H, cov = collector.hessians("exps_in", blend_rare=True)
    own0 = (x0 * a0[:, None]).T @ x0 / a0.sum()
    assert torch.allclose(H[0], own0, atol=1e-6)
    pooled = ((x0 * a0[:, None]).T @ x0 + (x1 * a1[:, None]).T @ x1) / (a0.sum() + a1.sum())
    assert torch.allclose(H[2], pooled, atol=1e-6)
    lam = K * (a0.sum() + a1.sum()) / 23
    blended = ((x1 * a1[:, None]).T @ x1 + lam * pooled) / (a1.sum() + lam)
    assert torch.allclose(H[1], blended, atol=1e-5)
    assert cov.fallback == ["own", "blended", "pooled"] and cov.tokens == [20, 3, 0]
    # plain GPTQ: only the unseen expert falls back; the rare one keeps its own (unweighted) statistics
    plain = StatsCollector(n_experts=3, affinity=False, full=True)
    plain.observe("exps_in", x0, a0, 0)
    plain.observe("exps_in", x1, a1, 1)
    H, cov = plain.hessians("exps_in", blend_rare=False)
    assert torch.allclose(H[1], x1.T @ x1 / 3, atol=1e-6)
    assert cov.fallback == ["own", "own", "pooled"]
    assert torch.allclose(plain.inputs["exps_in"].plain_sq[0], (x0 * x0).sum(0).double())
    # llama.cpp's neutral prior (the benchmark's +neutralprior): every expert blended with the identity times the
    # pooled mean channel energy, worth one token of the layer's average weight; the unseen expert gets the prior alone
    H, cov = collector.hessians("exps_in", blend_rare="neutral")
    one = (a0.sum() + a1.sum()) / 23
    neutral = pooled.diagonal().mean() * torch.eye(K)
    assert torch.allclose(H[0], ((x0 * a0[:, None]).T @ x0 + one * neutral) / (a0.sum() + one), atol=1e-5)
    assert torch.allclose(H[1], ((x1 * a1[:, None]).T @ x1 + one * neutral) / (a1.sum() + one), atol=1e-5)
    assert torch.allclose(H[2], neutral, atol=1e-6)
    assert cov.fallback == ["own", "blended", "neutral prior"]


def test_per_head_inputs_get_one_hessian_per_head():
    """MLA's attn_k_b / attn_v_b are [H, out, in] stacks, one matrix per head: observed as x [T, H, K],
    each head gets the statistics of its own input over every token (never blended, even with T < K)."""
    T, H, K = 5, 3, 8
    x = torch.randn(T, H, K, generator=torch.Generator().manual_seed(0))
    collector = StatsCollector(n_experts=16, affinity=True, full=True)
    collector.observe("q_nope", x[:2], None, None)
    collector.observe("q_nope", x[2:], None, None)
    hess, _ = collector.hessians("q_nope", blend_rare=True)
    diag, _ = collector.diagonals("q_nope", blend_rare=True)
    assert hess.shape == (H, K, K) and not collector.inputs["q_nope"].routed
    for h in range(H):
        assert torch.allclose(hess[h], x[:, h].T @ x[:, h] / T, atol=1e-6)
        assert torch.allclose(diag[h], (x[:, h] ** 2).mean(0), atol=1e-6)
    assert collector.inputs["q_nope"].count.tolist() == [T] * H


def test_scaled_input_matches_observing_the_scaled_input():
    """scale_input(r) leaves the sums that observing x * r would have given, the pooled ones (which rare experts fall
    back on) included: one r for every expert (smoothing) and one per expert (per-expert smoothing)."""
    K, E = 6, 3
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, K, generator=gen) for n in (20, 3, 9)]
    weights = [torch.rand(x.shape[0], generator=gen) for x in xs]
    for r in (torch.rand(1, K, generator=gen) + 0.5, torch.rand(E, K, generator=gen) + 0.5):
        scaled, direct = (StatsCollector(E, affinity=True, full=True) for _ in range(2))
        for e, (x, a) in enumerate(zip(xs, weights)):
            scaled.observe("exps_in", x, a, e)
            direct.observe("exps_in", x * r[e if r.shape[0] > 1 else 0], a, e)
        scaled.scale_input("exps_in", r)
        got, want = scaled.inputs["exps_in"], direct.inputs["exps_in"]
        for field in ("weighted_xxt", "weighted_sq", "plain_sq", "pooled_xxt", "pooled_sq"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5, msg=field)
        torch.testing.assert_close(scaled.hessians("exps_in", True)[0], direct.hessians("exps_in", True)[0],
                                   rtol=1e-5, atol=1e-5)
