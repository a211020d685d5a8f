"""Calibration data: EBSS self-sampling (ebss.py), the expert-balance metric (balance.py), and our statistics
exported as llama.cpp's GGUF imatrix (imatrix_export.py).

`calibrate` is the public function behind `moeq2gguf calibrate`, with the same parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moeq2gguf.calib.balance import BalanceStats, balance_report, balance_sigma, format_reach, format_report
from moeq2gguf.calib.ebss import DEFAULT_TAU, EBSSConfig, EBSSResult, cached_ebss, generate_ebss
from moeq2gguf.calib.imatrix_export import ImatrixResult, export_imatrix
from moeq2gguf.errors import Moeq2ggufError

__all__ = ["BalanceStats", "CalibrateResult", "DEFAULT_TAU", "EBSSConfig", "EBSSResult", "balance_report",
           "balance_sigma", "cached_ebss", "calibrate", "export_imatrix", "format_reach", "format_report",
           "generate_ebss"]


@dataclass
class CalibrateResult:
    ebss: EBSSResult | None = None
    report: list[BalanceStats] = field(default_factory=list)
    imatrix: ImatrixResult | None = None


def calibrate(model_dir: str | Path, config=None, *, progress: bool = True, **options) -> CalibrateResult:
    """Generate EBSS data (ebss=True, written to `output`, a .jsonl) and/or report the expert balance
    of calibration sets (`report`: split names or files), the new EBSS file first, at equal token count.
    config: a moeq2gguf.config.CalibrateConfig, or its fields as keywords (output=..., ebss=True, n=..., tau=...)."""
    from moeq2gguf.config import CalibrateConfig
    if config is None:
        config = CalibrateConfig(**options)
    elif options:
        raise TypeError(f"calibrate() takes a CalibrateConfig or keywords, not both ({', '.join(options)})")
    from moeq2gguf.io.hub import resolve_model
    model_dir = resolve_model(model_dir)
    if not model_dir.is_dir():
        raise Moeq2ggufError(f"model directory {model_dir} is not a directory; pass a Hugging Face checkpoint folder")
    result = CalibrateResult()
    model = None
    if config.ebss:
        from moeq2gguf.calib.balance import load_model, resolve_device
        model = load_model(model_dir, resolve_device(config.device))
        result.ebss = generate_ebss(model_dir, config.output, config.ebss_config, progress=progress, model=model)
    if config.imatrix_out:
        from moeq2gguf.calib.balance import resolve_device
        source = config.calib or (str(result.ebss.output) if result.ebss else "calib")
        result.imatrix = export_imatrix(model_dir, config.imatrix_out, source, config.calib_windows, config.calib_ctx,
                                        config.imatrix_weighting, resolve_device(config.device), progress)
    sources = ([str(result.ebss.output)] if result.ebss else []) + list(config.report)
    if config.report:
        result.report = balance_report(model_dir, sources, device=config.device, model=model, reach=config.reach)
    return result
