import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moeq2gguf.calib import corpus  # noqa: E402
from testing import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def eval_text() -> str:
    return corpus.read_text("eval")


@pytest.fixture(scope="session")
def small_tokenizers(eval_text):
    """One small BPE tokenizer per family's special-token convention, trained on a slice of eval text."""
    texts = [eval_text[:300_000]]
    return {family: train_bpe_tokenizer(texts, 512, family) for family in ("mixtral", "qwen2moe")}


@pytest.fixture()
def one_thread():
    """Tiny models: one thread is faster than two, and much faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
