import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moeq2gguf import corpus  # noqa: E402
from moeq2gguf.testing import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def eval_text() -> str:
    return corpus.read_text("eval")


@pytest.fixture(scope="session")
def small_tokenizers(eval_text):
    """One small BPE tokenizer per family's special-token convention, trained on a slice of eval text."""
    texts = [eval_text[:300_000]]
    return {family: train_bpe_tokenizer(texts, 512, family) for family in ("mixtral", "qwen2moe")}
