"""Shared checks for tests: llama.cpp (through llama-cpp-python) against transformers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moeq2gguf import runtime

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "moeq2gguf" / "fixtures"


def eval_tokens(tokenizer, text: str, n: int, offset: int = 0) -> list[int]:
    ids = tokenizer(text[offset: offset + 20 * n])["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def transformers_logits(model_or_dir, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.float().eval()(torch.tensor([tokens])).logits[0].numpy()


def llama_logits(gguf_path, tokens: list[int]) -> np.ndarray:
    with runtime.load(gguf_path) as llm:
        return runtime.logits(llm, tokens)


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| over max |ref|: one number for a whole logits matrix."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())
