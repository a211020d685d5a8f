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


def test_expert_without_tokens_uses_pooled_hessian(qwen_checkpoint, tmp_path, monkeypatch):
    """A router forced away from expert 3: the expert is quantized from the layer's pooled Hessian,
    reported as such, and never zeroed."""
    from moeq2gguf import nn
    real = nn.router_logits
    monkeypatch.setattr(nn, "router_logits", lambda x, w: real(x, w).index_fill(1, torch.tensor([3]), float("-inf")))
    out = tmp_path / "forced.gguf"
    result = convert(qwen_checkpoint, out, type="Q4_K_M", method="moequant", calib="eval", calib_windows=2, calib_ctx=256,
                     rotate=False, progress=False)  # unrotated: the dequantized expert is compared with the checkpoint's
    assert result.to_dict()["expert_coverage"]["pooled"] >= 3   # convert --json's count: expert 3 of three tensors at least
    coverage = json.loads(out.with_name(out.name + ".coverage.json").read_text())
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        entry = coverage[name]
        assert entry["tokens"][3] == 0 and entry["fallback"][3] == "pooled", name
        assert sum(entry["tokens"]) == 2 * 256 * 2  # every token reached its top-2 among the others
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, 256, 256)
    original = load_file(qwen_checkpoint / "model.safetensors")["model.layers.0.mlp.experts.3.up_proj.weight"].float().numpy()
    assert np.abs(deq[3]).max() > 0
    assert np.abs(deq[3] - original).mean() < 0.2 * np.abs(original).mean()
