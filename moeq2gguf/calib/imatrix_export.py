"""Our calibration statistics as llama.cpp's GGUF importance matrix (what llama-imatrix writes, what
llama-quantize --imatrix and ik_llama.cpp read).

The file: general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size, and per weight
`<name>.in_sum2` F32 [n_mat, n_in] (sum of x^2 over the tokens that reached matrix j) and
`<name>.counts` F32 [n_mat, 1] (those tokens); n_mat is the number of experts for a routed expert
stack (per-expert counts), the heads for MLA's per-head stacks, 1 otherwise. llama-quantize uses
in_sum2 / counts per matrix, and all ones where a count is 0.

Two weightings (moeq2gguf.imatrix.weighting in the file):
- plain (default): llama-imatrix's own statistic, from the calibration forward (nn), which sees what the
  runtime computes: on the same text and windows the entries equal llama-imatrix's (tests/calib/
  test_imatrix_export.py);
- affinity: each token's x^2 weighted by the routing weight the runtime multiplies that expert's output by
  (MoEQuant's AGQ, docs/METHODS.md section 3), and a gated shared expert's by its sigmoid gate; other
  inputs are as in plain. llama.cpp's loader rounds
  counts to integers, so the weighted sum is stored rescaled to the token count: in_sum2 = sum(a x^2) * n /
  sum(a), counts = n, whose ratio is the weighted mean. Fed to llama-quantize (a diagonal importance, no
  error feedback) it did not help on the bundled models (the test prints the KLDs), unlike in moequant's
  GPTQ Hessians; hence not the default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec
from moeq2gguf.nn import rms_norm
from moeq2gguf.passes.calibration import BlockView, Plugin
from moeq2gguf.passes.layers import input_of
from moeq2gguf.quant.stats import StatsCollector

WEIGHTINGS = ("affinity", "plain")
WEIGHTING_KEY = "moeq2gguf.imatrix.weighting"


@dataclass
class ImatrixEntry:
    sums: np.ndarray     # [n_mat, n_in] float64
    counts: np.ndarray   # [n_mat] float64 (whole token counts)


@dataclass
class ImatrixPlugin(Plugin):
    """A float-pass plug-in collecting one entry per quantizable weight."""
    spec: ModelSpec
    weighting: str = "plain"
    device: torch.device | str = "cpu"
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    _collector: StatsCollector | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise Moeq2ggufError(f"imatrix weighting {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")

    def observer(self, bid: int, weights: dict[str, torch.Tensor]) -> StatsCollector:
        self._collector = StatsCollector(self.spec.n_experts, affinity=self.weighting == "affinity", full=False,
                                         device=self.device)
        return self._collector

    def after_block(self, view: BlockView) -> None:
        inputs = self._collector.inputs
        for key, w in view.weights.items():
            name = f"blk.{view.bid}.{key}"
            source = input_of(name)
            if not key.endswith(".weight") or w.dim() < 2 or source not in inputs:
                continue
            s = inputs[source]
            count = s.count.double().cpu()
            if self.weighting == "affinity":
                mass = s.mass.double().cpu()
                scale = torch.where(mass > 0, count / mass.clamp_min(1e-300), torch.zeros_like(mass))
                sums = s.weighted_sq.double().cpu() * scale[:, None]
            else:
                sums = s.plain_sq.double().cpu()
            self.entries[name] = ImatrixEntry(sums.numpy(), count.numpy())
        self._collector = None

    def head(self, x: torch.Tensor, tail: dict[str, torch.Tensor]) -> None:
        if "output.weight" not in tail:   # tied head: llama-imatrix records no entry for token_embd either
            return
        normed = rms_norm(x, tail["output_norm.weight"], self.spec.rms_norm_eps).reshape(-1, x.shape[-1])
        sq = (normed.double() ** 2).sum(0).cpu().numpy()
        self.entries["output.weight"] = ImatrixEntry(sq[None, :], np.array([float(normed.shape[0])]))


def write_imatrix(path: str | os.PathLike[str], entries: dict[str, ImatrixEntry], datasets: list[str],
                  chunk_count: int, chunk_size: int, weighting: str) -> Path:
    """Write the entries as a llama.cpp GGUF imatrix, under a temporary name renamed when complete."""
    path = Path(path)
    if not entries:
        raise Moeq2ggufError("no statistics to write: the calibration pass observed no quantizable weight")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", datasets)
        writer.add_uint32("imatrix.chunk_count", chunk_count)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        writer.add_string(WEIGHTING_KEY, weighting)
        for name in sorted(entries):
            e = entries[name]
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class ImatrixResult:
    output: Path
    entries: int
    windows: int
    ctx: int
    weighting: str
    seconds: float


def export_imatrix(model_dir: str | Path, output: str | os.PathLike[str], source: str = "calib", n_windows: int = 32,
                   ctx: int = 512, weighting: str = "plain", device: torch.device | str = "cpu",
                   progress: bool = True) -> ImatrixResult:
    """One float pass of the calibration windows through the model (the calibration forward), written as a GGUF imatrix."""
    import time

    from tqdm import tqdm

    from moeq2gguf.calib.sources import calibration_windows
    from moeq2gguf.models.registry import open_model
    from moeq2gguf.passes.calibration import float_pass
    from moeq2gguf.passes.layers import Layers
    t0 = time.time()
    output = Path(output)
    if not output.parent.is_dir():
        raise Moeq2ggufError(f"output folder {output.parent} does not exist; create it or choose another --imatrix-out path")
    adapter = open_model(model_dir)
    sources = adapter.all_tensors()
    adapter.check_all_used(sources)
    windows = calibration_windows(adapter.reader.model_dir, source, n_windows, ctx)
    plugin = ImatrixPlugin(adapter.spec, weighting, device)
    bar = tqdm(total=adapter.spec.n_layers, desc="imatrix", unit="layer", disable=not progress)
    float_pass(Layers.of(sources, adapter.spec.n_layers), adapter.spec, windows, [plugin], "--imatrix-out", device,
               progress=lambda bid: bar.update(1))
    bar.close()
    write_imatrix(output, plugin.entries, [source], int(windows.shape[0]), int(windows.shape[1]), weighting)
    return ImatrixResult(output, len(plugin.entries), int(windows.shape[0]), int(windows.shape[1]), weighting,
                         time.time() - t0)
