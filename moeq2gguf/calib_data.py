"""Calibration token windows, cut the way llama-imatrix cuts its input.

The text (a split name or the user's file) is tokenized once with the checkpoint's Hugging Face
tokenizer (equal to llama.cpp's, which the tests check), cut into consecutive windows of `ctx`
tokens, and each window's first token is replaced by BOS when the vocabulary adds one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeq2gguf import corpus
from moeq2gguf.errors import Moeq2ggufError


def calibration_windows(model_dir: str | Path, source: str = "calib", n_windows: int = 64, ctx: int = 512) -> torch.Tensor:
    """[n, ctx] token ids (int64); fewer than n_windows when the text is short, never zero."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(corpus.read_text(source))["input_ids"]
    n = min(n_windows, len(ids) // ctx)
    if n < 1:
        raise Moeq2ggufError(f"calibration text {source!r} has {len(ids)} tokens, fewer than one window of {ctx}; "
                             "give more text or a smaller calibration context")
    windows = torch.tensor(ids[: n * ctx], dtype=torch.int64).view(n, ctx)
    bos = tokenizer.bos_token_id
    adds_bos = bool(tokenizer("a")["input_ids"][:1] == [bos]) if bos is not None else False
    if adds_bos:
        windows[:, 0] = bos
    return windows
