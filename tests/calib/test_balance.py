"""The expert-balance metric: hand-computed values, counts against the family's own router, reports."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moeq2gguf.calib.balance import (balance_report, balance_sigma, expert_counts, expert_top_k, format_report,
                                     layer_sigma, router_layer_ids, selection_counts)
from moeq2gguf.errors import Moeq2ggufError
from testing import make_config, random_model


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
    # 2 rows x 2 tokens, E = 4, k = 2, one layer
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0],    # row 0: experts 0, 1
                           [0.0, 1.0, 5.0, 4.0],    # row 0: experts 2, 3
                           [9.0, -1.0, 8.0, 0.0],   # row 1: experts 0, 2
                           [1.0, 2.0, 3.0, -5.0]])  # row 1: experts 2, 1
    total = selection_counts((logits, -logits), top_k=2, n_experts=4)
    assert total.tolist() == [[2, 2, 3, 1], [2, 2, 1, 3]]
    per_row = selection_counts((logits,), top_k=2, n_experts=4, n_rows=2)
    assert per_row.shape == (2, 1, 4)
    assert per_row[:, 0].tolist() == [[1, 1, 1, 1], [1, 1, 2, 0]]


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_counts_match_the_models_own_router(family):
    """Our arg-top-k of the router logits equals the experts transformers' router itself picks."""
    model = random_model(family, seed=3)
    picked = []
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [r.register_forward_hook(lambda mod, inp, out: picked.append(out[2])) for r in routers]
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    try:
        counts = expert_counts(model, ids, batch=2)
    finally:
        for h in hooks:
            h.remove()
    E = counts.shape[1]
    n_layers = len(routers)
    expected = torch.zeros(n_layers, E, dtype=torch.int64)
    for i, idx in enumerate(picked):            # batches of 2 then 1, layers in order within each
        expected[i % n_layers] += torch.bincount(idx.flatten(), minlength=E)
    assert counts.tolist() == expected.tolist()
    assert counts.sum(1).tolist() == [3 * 20 * model.config.num_experts_per_tok] * n_layers
    assert router_layer_ids(model) == list(range(model.config.num_hidden_layers))


def test_unsupported_router_is_an_error():
    config = make_config("deepseek_v3")
    with pytest.raises(Moeq2ggufError, match="model_type 'deepseek_v3' is not supported"):
        expert_top_k(config)


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
