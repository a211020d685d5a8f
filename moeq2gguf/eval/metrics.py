"""Streaming quality metrics of a quantized model's next-token distributions against a base model.

Pure numpy, no I/O. Memory is fixed whatever the number of windows: sums for PPL and mean KLD,
and a log-spaced histogram for the KLD percentiles (relative resolution about 0.3%).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (logits [n, vocab])."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(base_logp: np.ndarray, quant_logp: np.ndarray) -> np.ndarray:
    """KL(base || quant) per row, from log-probabilities [n, vocab]."""
    return np.maximum((np.exp(base_logp) * (base_logp - quant_logp)).sum(axis=-1), 0.0)


class LogHistogram:
    """Percentiles of non-negative values from counts in log-spaced bins (fixed memory)."""

    def __init__(self, lo: float = 1e-10, hi: float = 1e3, bins: int = 8192):
        self.edges = np.geomspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins + 2, dtype=np.int64)  # [below lo, bins..., above hi]

    def add(self, values: np.ndarray) -> None:
        idx = np.searchsorted(self.edges, values, side="right")
        np.add.at(self.counts, idx, 1)

    def percentile(self, q: float) -> float:
        total = self.counts.sum()
        if total == 0:
            return float("nan")
        k = np.searchsorted(np.cumsum(self.counts), q / 100 * total, side="left")
        if k == 0:
            return 0.0
        if k >= len(self.counts) - 1:
            return float(self.edges[-1])
        return float(np.sqrt(self.edges[k - 1] * self.edges[k]))  # geometric bin centre


@dataclass
class QualityAccumulator:
    n: int = 0
    base_nll: float = 0.0
    quant_nll: float = 0.0
    kld_sum: float = 0.0
    same_top1: int = 0
    kld_hist: LogHistogram = field(default_factory=LogHistogram)

    def add(self, base_logits: np.ndarray, quant_logits: np.ndarray, targets: np.ndarray) -> None:
        """base/quant logits [n, vocab] at the scored positions; targets [n] the next tokens."""
        base_lp, quant_lp = log_softmax(base_logits), log_softmax(quant_logits)
        rows = np.arange(len(targets))
        self.base_nll -= base_lp[rows, targets].sum()
        self.quant_nll -= quant_lp[rows, targets].sum()
        kld = kl_divergence(base_lp, quant_lp)
        self.kld_sum += kld.sum()
        self.kld_hist.add(kld)
        self.same_top1 += int((base_logits.argmax(-1) == quant_logits.argmax(-1)).sum())
        self.n += len(targets)

    def summary(self) -> dict[str, float]:
        base_ppl, quant_ppl = float(np.exp(self.base_nll / self.n)), float(np.exp(self.quant_nll / self.n))
        return {
            "tokens_scored": self.n,
            "ppl_base": base_ppl,
            "ppl_quant": quant_ppl,
            "ppl_ratio": quant_ppl / base_ppl,
            "kld_mean": self.kld_sum / self.n,
            "kld_p99": self.kld_hist.percentile(99.0),
            "kld_p99_9": self.kld_hist.percentile(99.9),
            "same_top1_pct": 100.0 * self.same_top1 / self.n,
        }
