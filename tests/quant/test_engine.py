"""The quantization engine end to end on small random models, and GPTQ into every block format."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moeq2gguf import convert
from moeq2gguf.formats import FORMATS
from moeq2gguf.quant.gptq import gptq_quantize
from moeq2gguf.quant.grid import FormatGrid
from testing import random_model, save_checkpoint

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", sorted(FORMATS, key=lambda q: q.name), ids=lambda q: q.name)
def test_gptq_bytes_dequantize_to_simulated_weights(qtype):
    """Every format: the packed bytes dequantize (gguf-py) to exactly the weights GPTQ simulated."""
    gen = torch.Generator().manual_seed(int(qtype))
    G, R, K = 2, 8, 256
    W = torch.randn(G, R, K, generator=gen)
    X = torch.randn(G, 512, K, generator=gen) * torch.linspace(0.2, 3, K)
    H = X.transpose(1, 2) @ X / 512
    grid = FormatGrid(qtype)
    grid.prepare(W)
    Qw, codes, params = gptq_quantize(W, H, grid)
    data = grid.pack(params, codes)
    deq = gguf.quants.dequantize(data, qtype).reshape(G, R, K)
    assert np.array_equal(deq, Qw.numpy())


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory, small_tokenizers):
    tmp = tmp_path_factory.mktemp("engine")
    model = random_model("qwen2moe", hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                         num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, init_std=0.05)
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp / "ckpt")


def test_gptq_below_rtn_on_every_tensor(qwen_checkpoint, tmp_path):
    # (determinism: tests/test_parallel.py compares separate processes' files byte for byte)
    kwargs = dict(type="Q3_K_M", method="moequant", calib="eval", calib_windows=4, calib_ctx=256, progress=False)
    first = convert(qwen_checkpoint, tmp_path / "a.gguf", **kwargs)
    rows = {n: t for n, t in first.report.tensors.items() if "recon_error" in t}
    assert rows, "no tensor went through GPTQ"
    for name, t in rows.items():
        assert t["recon_error"] < t["recon_error_rtn"], name


def test_experts_without_tokens_and_in_groups(qwen_checkpoint, tmp_path, monkeypatch):
    """A router forced away from experts 3-5: they are quantized from the layer's pooled Hessian, reported as such,
    and never zeroed. The same conversion with --expert-group 3 (groups of 3, 3, 2 of the 8 experts, statistics from
    the stored FFN inputs; experts 3-5 a whole group that saw nothing) writes the same bytes and report, with a smaller
    peak of routed statistics."""
    from moeq2gguf import nn
    real = nn.router_logits
    monkeypatch.setattr(nn, "router_logits",
                        lambda x, w: real(x, w).index_fill(1, torch.tensor([3, 4, 5]), float("-inf")))
    out = tmp_path / "forced.gguf"
    kwargs = dict(type="Q4_K_M", method="moequant", calib="eval", calib_windows=2, calib_ctx=256, rotate=False,
                  progress=False)  # unrotated: the dequantized expert is compared with the checkpoint's
    result = convert(qwen_checkpoint, out, **kwargs)
    assert result.to_dict()["expert_coverage"]["pooled"] >= 9   # convert --json's count: experts 3-5 of three tensors
    coverage = json.loads(out.with_name(out.name + ".coverage.json").read_text())
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        entry = coverage[name]
        assert entry["tokens"][3] == 0 and entry["fallback"][3:6] == ["pooled"] * 3, name
        assert sum(entry["tokens"]) == 2 * 256 * 2  # every token reached its top-2 among the others
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, 256, 256)
    original = load_file(qwen_checkpoint / "model.safetensors")["model.layers.0.mlp.experts.3.up_proj.weight"].float().numpy()
    assert np.abs(deq[3]).max() > 0
    assert np.abs(deq[3] - original).mean() < 0.2 * np.abs(original).mean()

    grouped = convert(qwen_checkpoint, tmp_path / "grouped.gguf", expert_group=3, **kwargs)
    assert out.read_bytes() == (tmp_path / "grouped.gguf").read_bytes()
    assert grouped.report.coverage == result.report.coverage
    assert list(grouped.report.tensors) == list(result.report.tensors)   # file order
    for name, t in result.report.tensors.items():   # errors summed over groups: the same up to the last bits
        g = grouped.report.tensors[name]
        assert {k: v for k, v in g.items() if "error" not in k} == {k: v for k, v in t.items() if "error" not in k}
        assert all(abs(g[k] - t[k]) <= 1e-12 * abs(t[k]) for k in t if "error" in k), name
    assert grouped.report.expert_stats_peak_bytes < 0.6 * result.report.expert_stats_peak_bytes
    assert grouped.to_dict()["expert_groups"] == {"0": 3, "1": 3} and result.to_dict()["expert_groups"] == {}


def test_expert_group_plan():
    """passes/expert_groups.plan: all at once when the layer fits, else groups sized to the budget; on a GPU the expert
    weights go to the host when they alone would crowd out a group; --expert-group N is taken as given."""
    from types import SimpleNamespace
    from moeq2gguf.passes import expert_groups
    stacks = [SimpleNamespace(name=f"blk.0.ffn_{p}_exps.weight", shape=(64, *shape), role="expert")
              for p, shape in (("gate", (1408, 2048)), ("up", (1408, 2048)), ("down", (2048, 1408)))]
    weights, per_expert = expert_groups.layer_bytes(stacks, True)
    assert weights == 2 * 4 * 64 * 3 * 1408 * 2048
    assert per_expert > 4 * (2048 ** 2 + 1408 ** 2)    # at least the two inputs' Hessians
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    spare = 3 * expert_groups.FACTOR_CHUNK_BYTES
    roomy = int((weights + 64 * per_expert + spare) / expert_groups.BUDGET_FRACTION) + 1
    assert expert_groups.plan(stacks, 64, True, cpu, None, available=roomy) is None
    tight = int((weights + 10.5 * per_expert + spare) / expert_groups.BUDGET_FRACTION)
    assert expert_groups.plan(stacks, 64, True, cpu, None, available=tight) == \
        expert_groups.ExpertGrouping(10, False, tuple(s.name for s in stacks))
    small_gpu = int((weights / 2 + spare) / expert_groups.BUDGET_FRACTION)
    g = expert_groups.plan(stacks, 64, True, cuda, None, available=small_gpu)
    assert g.host_stacks and 1 <= g.size < 64
    g = expert_groups.plan(stacks, 64, True, cpu, None, available=int(weights / 2 / expert_groups.BUDGET_FRACTION))
    assert g.size == 1 and not g.fits and not g.host_stacks   # the CPU has no host to move the weights to
    # a GPU with room for the weights beside 10 experts' work: the host copy gives groups more than twice as large
    g = expert_groups.plan(stacks, 64, True, cuda, None, available=tight)
    assert g.host_stacks and g.size > 20 and g.fits
    assert expert_groups.plan(stacks, 64, True, cpu, 16, available=roomy).size == 16
    assert expert_groups.plan(stacks, 64, True, cpu, 64, available=roomy) is None


@pytest.mark.parametrize("method, qtype", [("moequant", Q.Q6_K), ("moequant", Q.IQ2_XXS), ("imatrix", Q.Q4_K),
                                           ("rtn", Q.Q5_K)])
def test_the_head_in_row_blocks_is_the_same_bytes(method, qtype):
    """quantize_rows (the tensors after the last layer, a block of rows at a time: bounded memory for a large
    vocabulary's head) writes the bytes of quantizing the matrix whole, and sums its errors."""
    from moeq2gguf import methods
    from moeq2gguf.passes.quantize import QuantConfig
    from moeq2gguf.quant.stats import StatsCollector
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 256, generator=gen) * torch.linspace(0.5, 2, 300)[:, None]
    stats = StatsCollector(1, affinity=False, full=True)
    stats.observe("output", torch.randn(512, 256, generator=gen) * torch.linspace(0.2, 3, 256), None, None)
    m, gptq = methods.get(method), QuantConfig(method=method).gptq
    whole = methods.quantize_tensor(m, w, qtype, stats, "output", gptq)
    data, info = methods.quantize_rows(m, w, qtype, stats, "output", gptq, block_bytes=64 * 256 * 4)   # 5 blocks
    assert data.shape == whole.data.shape and np.array_equal(data, whole.data)
    assert info.keys() == whole.info.keys()
    for key in info:
        assert info[key] == (pytest.approx(whole.info[key], rel=1e-9) if key.startswith("recon") else whole.info[key])
