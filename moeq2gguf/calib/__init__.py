"""Calibration data: EBSS self-sampling (ebss.py) and the expert-balance metric (balance.py).

`calibrate` is the public function behind `moeq2gguf calibrate`, with the same parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moeq2gguf.calib.balance import BalanceStats, balance_report, balance_sigma, format_report
from moeq2gguf.calib.ebss import DEFAULT_TAU, EBSSConfig, EBSSResult, cached_ebss, generate_ebss
from moeq2gguf.errors import Moeq2ggufError

__all__ = ["BalanceStats", "CalibrateResult", "DEFAULT_TAU", "EBSSConfig", "EBSSResult", "balance_report",
           "balance_sigma", "cached_ebss", "calibrate", "format_report", "generate_ebss"]


@dataclass
class CalibrateResult:
    ebss: EBSSResult | None = None
    report: list[BalanceStats] = field(default_factory=list)


def calibrate(model_dir: str | Path, output: str | Path | None = None, ebss: bool = False, n: int = 128,
              length: int = 512, beams: int = 4, tau: float | None = None, topk: int = 64, seed: int = 0,
              eos_guard: bool = True, ngram_guard: int = 4, repetition_penalty: float = 1.1, balance: str = "candidate",
              report: tuple[str, ...] = (), device: str | None = None, progress: bool = True) -> CalibrateResult:
    """Generate EBSS data (ebss=True, written to `output`, a .jsonl) and/or report the expert balance
    of calibration sets (`report`: split names or files), the new EBSS file first, at equal token count.
    tau None: DEFAULT_TAU."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise Moeq2ggufError(f"model directory {model_dir} is not a directory; pass a Hugging Face checkpoint folder")
    if not ebss and not report:
        raise Moeq2ggufError("calibrate: nothing to do; pass --ebss -o FILE.jsonl and/or --report SPLIT|FILE")
    if ebss and output is None:
        raise Moeq2ggufError("calibrate --ebss needs -o FILE.jsonl to write the generated sequences to")
    if not ebss and output is not None:
        raise Moeq2ggufError("calibrate -o is only used with --ebss; add --ebss or drop -o")
    cfg = EBSSConfig(n=n, length=length, beams=beams, tau=DEFAULT_TAU if tau is None else tau, topk=topk, seed=seed,
                     eos_guard=eos_guard, ngram_guard=ngram_guard, repetition_penalty=repetition_penalty, balance=balance)
    result = CalibrateResult()
    model = None
    if ebss:
        if Path(output).suffix != ".jsonl":
            raise Moeq2ggufError(f"EBSS output {output} must end in .jsonl (one {{\"text\", \"ids\"}} record per line)")
        from moeq2gguf.calib.balance import load_model, resolve_device
        model = load_model(model_dir, resolve_device(device))
        result.ebss = generate_ebss(model_dir, output, cfg, progress=progress, model=model)
    sources = ([str(result.ebss.output)] if result.ebss else []) + [str(s) for s in report]
    if report:
        result.report = balance_report(model_dir, sources, device=device, model=model)
    return result
