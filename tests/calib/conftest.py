from pathlib import Path

import pytest
import torch

from testing import random_model, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every calibration test runs on one thread (tests/conftest.py's one_thread)."""


def biased_mixtral(strength: float = 1.0, seed: int = 0):
    """A tiny random Mixtral (4 experts, top-2) whose routers all favour expert 0: every token
    embedding carries +1 in channel 0 and each router's row 0 reads that channel."""
    model = random_model("mixtral", seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.mlp.gate.weight[0, 0] = strength
    return model


@pytest.fixture()
def biased_checkpoint(tmp_path: Path, small_tokenizers) -> Path:
    return save_checkpoint(biased_mixtral(), small_tokenizers["mixtral"], tmp_path / "biased")
