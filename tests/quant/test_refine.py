"""--refine (quant/refine.py): with no step taken the tunable codes are GPTQ's exactly, for every K-quant, and moved
block scales pack into bytes that decode to the tuned values; a refined
conversion lowers each layer's output error (never raises its loss), writes bytes that decode to the tuned weights
(checked inside the pass) and runs in llama.cpp; methods without GPTQ refuse it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moeq2gguf import convert, runtime
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.quant.gptq import gptq_quantize
from moeq2gguf.quant.grid import FormatGrid
from moeq2gguf.quant.refine import KQuantCodes
from testing import random_model, save_checkpoint


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_zero_offsets_give_gptqs_codes_and_weights(qtype):
    torch.manual_seed(0)
    G, R, K = 2, 8, 512
    X = torch.randn(G, 600, K)
    H = torch.einsum("gtk,gtl->gkl", X, X) / 600
    W = torch.randn(G, R, K) * 0.05
    W[0, 0, :256] = 0.0                       # an all-zero block: ggml's fallback codes, frozen
    W[1, 1, :64] = torch.arange(64) * 0.01    # evenly spaced values: many land near a rounding boundary
    grid = FormatGrid(qtype)
    grid.prepare(W)
    rounded = torch.empty_like(W)
    Qw, codes, params = gptq_quantize(W, H, grid, targets=rounded)
    t = KQuantCodes(grid, params, codes, rounded, W.shape, torch.device("cpu"))
    zero = torch.zeros_like(t.u)
    assert torch.equal(t.codes(zero), codes.reshape(t.codes0.shape).float())
    assert torch.equal(t.values(zero), Qw)
    # a half-step offset moves codes by at most one, within the format's range
    moved = t.codes(torch.full_like(t.u, 0.49))
    assert ((moved - t.codes0).abs() <= 1).all() and moved.min() >= 0 and moved.max() <= t.offset + t.hi
    assert torch.equal(t.codes(zero, torch.zeros_like(t.d)), t.codes0)
    assert torch.equal(t.values(zero, torch.zeros_like(t.d)), Qw)
    # moved block scales: stored as fp16, and the packed bytes decode to exactly the values the refinement sees
    a = (torch.rand_like(t.d) - 0.5) * 0.4
    v = (torch.rand_like(t.u) - 0.5)
    d, _ = t.scales(a)
    assert torch.equal(d, d.to(torch.float16).to(torch.float32)) and not torch.equal(d, t.d)
    data = grid.pack(t.tuned_params(d), t.codes(v, a).to(torch.int32).reshape(-1, K))
    decoded = torch.from_numpy(np.asarray(grid.fmt.dequantize(data), dtype=np.float32)).reshape(W.shape)
    assert torch.equal(decoded, t.values(v, a))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizers):
    model = random_model("qwen2moe", hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                         num_hidden_layers=2, init_std=0.05)
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path_factory.mktemp("refine") / "ckpt")


def test_refined_conversion_lowers_each_layers_error_and_runs(checkpoint, tmp_path, one_thread):
    result = convert(checkpoint, tmp_path / "r.gguf", type="Q3_K_M", method="moequant", calib_windows=8, calib_ctx=32,
                     refine=24, refine_routing=1.0, rotate=False, progress=False)
    per_layer = result.report.refine
    assert sorted(per_layer) == [0, 1]
    for bid, r in per_layer.items():
        print(bid, r)
        before = r["error_before"] + r["routing_kl_before"]
        after = r["error_after"] + r["routing_kl_after"]
        assert after <= before
        assert r["error_after"] < r["error_before"] and r["codes_moved"] > 0 and r["scales_moved"] > 0
    assert {t["method"] for n, t in result.report.tensors.items() if n.endswith("ffn_up_exps.weight")} == {"moequant+refine24"}
    with runtime.load(result.output, n_ctx=64) as llm:
        assert np.isfinite(runtime.logits(llm, [1, 2, 3, 4])).all()


def test_refine_needs_gptq(checkpoint, tmp_path):
    with pytest.raises(Moeq2ggufError, match="--refine tunes what GPTQ chose; --method imatrix"):
        convert(checkpoint, tmp_path / "x.gguf", type="Q4_K_M", method="imatrix", refine=10, progress=False)
    assert not any(tmp_path.iterdir())
