"""The expert-balance metric: hand-computed values, counts against the family's own router, reports."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moeq2gguf import nn
from moeq2gguf.calib.balance import (ExpertSelector, balance_report, balance_sigma, expert_counts, format_report,
                                     layer_sigma, router_layer_ids, selection_counts)
from moeq2gguf.models.registry import open_model
from moeq2gguf.passes.layers import Layers, block_weights, run_block
from testing import FAMILY_CLASSES, random_model, save_checkpoint


def test_sigma_hand_computed():
    uniform = torch.tensor([[5, 5, 5, 5]])
    one_expert = torch.tensor([[8, 0, 0, 0]])             # freq (1, 0, 0, 0): std = sqrt(0.1875)
    half = torch.tensor([[2, 2, 0, 0]])                    # freq (.5, .5, 0, 0): std = 0.25
    assert balance_sigma(uniform).item() == 0.0
    assert balance_sigma(one_expert).item() == pytest.approx(math.sqrt(0.1875))
    # mean over layers; the count scale does not matter, only the frequencies
    two_layers = torch.stack([one_expert[0] * 3, half[0]])
    assert balance_sigma(two_layers).item() == pytest.approx((math.sqrt(0.1875) + 0.25) / 2)
    assert layer_sigma(two_layers).tolist() == pytest.approx([math.sqrt(0.1875), 0.25])
    # batched over leading dims (one sigma per beam), and an empty layer counts as balanced, not NaN
    beams = torch.stack([uniform, one_expert, torch.zeros(1, 4, dtype=torch.int64)])
    assert balance_sigma(beams).tolist() == pytest.approx([0.0, math.sqrt(0.1875), 0.0])


def test_selection_counts_hand_computed():
    # 2 rows x 2 tokens, E = 4, k = 2, one layer: the chosen ids of each token
    chosen = torch.tensor([[0, 1], [2, 3], [0, 2], [2, 1]])
    total = selection_counts([chosen, 3 - chosen], n_experts=4)
    assert total.tolist() == [[2, 2, 3, 1], [1, 3, 2, 2]]
    per_row = selection_counts([chosen], n_experts=4, n_rows=2)
    assert per_row.shape == (2, 1, 4)
    assert per_row[:, 0].tolist() == [[1, 1, 1, 1], [1, 1, 2, 0]]


@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
def test_counts_are_the_experts_the_family_routes_to(family, tmp_path, small_tokenizers):
    """Every family: the experts counted from transformers' router logits with the family's own rule are the ones
    transformers' router itself picks, and the ones the calibration forward (nn, as llama.cpp) routes to."""
    model = random_model(family, seed=3)
    if family == "deepseek_v3":   # a selection bias that changes the choice, as trained V3 routers have
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, m.e_score_correction_bias.numel()))
    tokenizer = small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"]
    ckpt = save_checkpoint(model, tokenizer, tmp_path / family)
    selector = ExpertSelector.for_model(model, ckpt)
    picked = []
    target = model.model._can_record_outputs["router_logits"].target_class
    routers = [m for m in model.modules() if isinstance(m, target)]
    def record(module, args, out):   # (logits, weights, ids); Llama-4's router gives (scores, logits)
        picked.append(out[2] if len(out) == 3 else out[1].topk(module.top_k, dim=-1).indices)
    hooks = [r.register_forward_hook(record) for r in routers]
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    try:
        counts = expert_counts(model, ids, selector, batch=3)
    finally:
        for h in hooks:
            h.remove()
    E, n_layers = counts.shape[1], len(routers)
    expected = torch.stack([torch.bincount(idx.flatten(), minlength=E) for idx in picked])
    assert counts.tolist() == expected.tolist()
    assert counts.sum(1).tolist() == [3 * 20 * selector.top_k] * n_layers
    # the calibration forward's routing of the same tokens (float32 checkpoint: same weights)
    adapter = open_model(ckpt)
    spec, layers = adapter.spec, Layers.of(adapter.all_tensors(), adapter.spec.n_layers)
    x = nn.embed(ids, layers.embedding.load().reshape(layers.embedding.shape))
    ours = []
    for bid, block in layers:
        routes = []
        x = run_block(x, block_weights(block), spec, None, bid, 3, routes)
        if routes:
            ours.append(torch.bincount(routes[0].experts.flatten(), minlength=E))
    assert torch.stack(ours).tolist() == counts.tolist()
    assert router_layer_ids(model) == list(spec.moe_layers)


def test_report_compares_at_equal_token_count(tmp_path, biased_checkpoint, small_tokenizers):
    ebss_file = tmp_path / "e.jsonl"
    tok = small_tokenizers["mixtral"]
    rows = [[tok.bos_token_id] + list(range(10 + i, 10 + i + 31)) for i in range(3)]   # 3 x 32 tokens
    ebss_file.write_text("".join(json.dumps({"text": "x", "ids": r}) + "\n" for r in rows))
    stats = balance_report(biased_checkpoint, [str(ebss_file), "calib"])
    assert [s.n_tokens for s in stats] == [96, 96]
    assert [(s.n_windows, s.ctx) for s in stats] == [(3, 32), (3, 32)]
    assert stats[0].counts.sum() == 96 * 2 * 2        # tokens x top-2 x 2 layers
    assert stats[1].sigma > 0.1                        # the biased router: expert 0 takes nearly every token
    text = format_report(stats)
    assert "e.jsonl" in text and "calib" in text
    assert len(text.splitlines()) == 2 + 2 + 2         # header, 2 layers, all, tokens
    d = stats[1].to_dict()
    assert d["tokens"] == 96 and set(d["layers"]) == {"0", "1"}


def test_reach_names_the_experts_no_token_selects(tmp_path, small_tokenizers):
    """--reach: an expert whose selection bias keeps it out of every top-k is listed for every layer, with the last
    rank; every expert that was selected has a best rank below top-k, every one never selected at or above it."""
    from moeq2gguf.calib import calibrate, format_reach
    model = random_model("glm4moe", seed=2)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias[3] = -100.0
    ckpt = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "glm")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} text{i % 13}" for i in range(3000)))
    (stats,) = calibrate(ckpt, report=[str(calib)], reach=True, progress=False).report
    k = model.config.num_experts_per_tok
    selected = stats.counts > 0
    assert (stats.best_rank[selected] < k).all() and (stats.best_rank[~selected] >= k).all()
    assert not selected[:, 3].any() and (stats.best_rank[:, 3] == model.config.n_routed_experts - 1).all()
    text = format_reach([stats], k)
    assert "experts never selected" in text
    assert all(f"layer {layer}: " in text for layer in stats.layer_ids)
    assert text.count(" e3 ") + text.count(": e3 ") >= len(stats.layer_ids)
