"""The engine's float layer math (GGUF orientation, llama.cpp's RoPE layout) against transformers."""
from __future__ import annotations

import pytest
import torch

from moeq2gguf import nn
from moeq2gguf.models.registry import open_model
from moeq2gguf.testing import random_model, save_checkpoint

CASES = {
    "mixtral": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3),
    "qwen2moe": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3),
}


def layer_weights(sources: dict, bid: int) -> dict[str, torch.Tensor]:
    prefix = f"blk.{bid}."
    return {n[len(prefix):]: s.load().reshape(s.shape) for n, s in sources.items() if n.startswith(prefix)}


@pytest.mark.parametrize("family", sorted(CASES))
def test_layer_outputs_match_transformers(family, tmp_path, small_tokenizers):
    model = random_model(family, **CASES[family])
    ckpt = save_checkpoint(model, small_tokenizers[family], tmp_path / "ckpt")
    adapter = open_model(ckpt)
    sources = {s.name: s for s in adapter.all_tensors()}
    tokens = torch.randint(0, adapter.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True)
        x = nn.embed(tokens, sources["token_embd.weight"].load())
        for bid in range(adapter.spec.n_layers):
            x, routing = nn.decoder_layer(x, layer_weights(sources, bid), adapter.spec)
            assert routing.experts.shape == (80, adapter.spec.n_experts_used)
            if bid < adapter.spec.n_layers - 1:  # transformers' last hidden state is after the final norm
                expected = ref.hidden_states[bid + 1]
                assert float((x - expected).abs().max() / expected.abs().max()) < 1e-5
        logits = nn.head(x, sources["output_norm.weight"].load(), sources["output.weight"].load(), adapter.spec)
        assert float((logits - ref.logits).abs().max() / ref.logits.abs().max()) < 1e-5
