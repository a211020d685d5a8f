"""Calibration token windows, cut the way llama-imatrix cuts its input.

The text (a split name or the user's file) is tokenized once with the checkpoint's Hugging Face
tokenizer (equal to llama.cpp's, which the tests check), cut into consecutive windows of `ctx`
tokens, and each window's first token is replaced by BOS when the vocabulary adds one.

EBSS data (moeq2gguf.calib.ebss) comes as token ids, one sequence per window: a .jsonl whose records
carry "ids" (what `moeq2gguf calibrate --ebss` writes) gives its own ids, each record cut to ctx. The
same BOS rule applies (EBSS sequences already start with BOS where one is added). The source name
"ebss" (sequences made on the model itself, cached) is resolved to such a file by calib/sources.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeq2gguf.calib import corpus
from moeq2gguf.errors import Moeq2ggufError


def token_windows(model_dir: str | Path, source: str = "calib", n_windows: int = 64, ctx: int = 512) -> torch.Tensor:
    """[n, ctx] token ids (int64) of a split name, a text file or folder, or a token-id .jsonl; fewer than
    n_windows when the text is short, never zero. (The source "ebss" is resolved by calib.sources.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if source not in corpus.NAMED and str(source).endswith(".jsonl"):
        rows = read_token_file(source)
        if rows is not None:
            return _id_windows(rows, tokenizer, str(source), n_windows, ctx)
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


def _id_windows(rows: list[list[int]], tokenizer, source: str, n_windows: int, ctx: int) -> torch.Tensor:
    """[n, ctx] windows from token-id records (EBSS), each record's first ctx ids."""
    long_enough = [r[:ctx] for r in rows if len(r) >= ctx][:n_windows]
    if not long_enough:
        raise Moeq2ggufError(f"calibration file {source} holds token sequences of at most {max(map(len, rows))} tokens, "
                             f"fewer than one window of {ctx}; pass --calib-ctx {max(map(len, rows))} or generate longer sequences")
    windows = torch.tensor(long_enough, dtype=torch.int64)
    if windows.max() >= len(tokenizer) or windows.min() < 0:
        raise Moeq2ggufError(f"calibration file {source} holds token ids outside this model's vocabulary of {len(tokenizer)}; "
                             "was it generated for another model?")
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        windows[:, 0] = bos
    return windows


def read_token_file(path: str | Path) -> list[list[int]] | None:
    """The "ids" of every record of a .jsonl written by EBSS, or None when the file is not one
    (a .txt, or a .jsonl whose records carry text only)."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return None
    rows = []
    for lineno, record in corpus.jsonl_records(p, "an object"):
        ids = record.get("ids") if isinstance(record, dict) else None
        if ids is None:
            return None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise Moeq2ggufError(f"{p}:{lineno}: \"ids\" must be a list of token ids")
        rows.append(ids)
    return rows or None
