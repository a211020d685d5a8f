"""A calibration source, as convert's --calib names it, to token windows: a stdlib split, a text file or folder,
a token-id .jsonl, or "ebss" (sequences the model writes for itself, generated once and cached)."""
from __future__ import annotations

from pathlib import Path

import torch

from moeq2gguf.calib.windows import token_windows


def calibration_windows(model_dir: str | Path, source: str = "calib", n_windows: int = 64, ctx: int = 512) -> torch.Tensor:
    """[n, ctx] token ids (int64); fewer than n_windows when the text is short, never zero."""
    if source == "ebss":
        from moeq2gguf.calib.ebss import EBSSConfig, cached_ebss
        source = str(cached_ebss(model_dir, EBSSConfig(n=n_windows, length=ctx), progress=None))
    return token_windows(model_dir, source, n_windows, ctx)
