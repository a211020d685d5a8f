"""Sequential layer-wise quantization (ALGORITHMS.md section 1), streamed in GGUF file order.

For each decoder layer, with only that layer's weights in memory:
  1. run the float layer on the current calibration hidden states, collecting input statistics;
  2. quantize the layer's tensors (rtn | imatrix | gptq | moequant);
  3. for gptq/moequant, re-run the layer with the dequantized weights to produce the next layer's
     inputs, so later layers see and compensate earlier errors. imatrix follows llama-imatrix, which
     collects on the float model.
`quantized_stream` yields each tensor's bytes in file order, so the writer streams them to disk.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from tqdm import tqdm

from moeq2gguf import nn
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, TensorSource
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import GPTQConfig
from moeq2gguf.quant.stats import StatsCollector

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType

METHODS = ("rtn", "imatrix", "gptq", "moequant")
CALIBRATED = ("imatrix", "gptq", "moequant")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"
    calib: str = "calib"               # split name or path to the user's text
    n_windows: int = 32
    ctx: int = 512
    batch_windows: int = 8             # windows per forward pass (memory)
    device: str = "cpu"
    gptq: GPTQConfig = GPTQConfig()
    imatrix_file: str | None = None    # a llama-imatrix GGUF to use instead of our statistics

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise Moeq2ggufError(f"--method {self.method} is unknown; choose one of {', '.join(METHODS)}")
        if self.n_windows < 1 or self.ctx < 2:
            raise Moeq2ggufError(f"calibration needs at least one window of 2+ tokens (got {self.n_windows} x {self.ctx})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise Moeq2ggufError("--device cuda: no CUDA device is visible to torch; use --device cpu")


@dataclass
class QuantReport:
    """Per tensor: type, method, reconstruction error vs RTN; per layer and expert: coverage."""
    tensors: dict[str, dict] = field(default_factory=dict)
    coverage: dict[str, dict] = field(default_factory=dict)


def _short(name: str) -> str:
    """blk.3.ffn_up_exps.weight -> ffn_up_exps"""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def _layer_weights(sources: list[TensorSource]) -> dict[str, torch.Tensor]:
    return {s.name.split(".", 2)[2]: s.load().reshape(s.shape) for s in sources}


def quantized_stream(adapter: FamilyAdapter, sources: list[TensorSource], types: list[Q], cfg: QuantConfig,
                     report: QuantReport, progress: bool = True) -> Iterator[np.ndarray]:
    """The bytes of every tensor, in the order of `sources` (GGUF file order)."""
    type_of = dict(zip((s.name for s in sources), types))
    spec = adapter.spec
    device = torch.device(cfg.device)

    if cfg.method == "rtn" or cfg.imatrix_file:
        importance = tensor_quant.load_imatrix(cfg.imatrix_file, sources) if cfg.imatrix_file else {}
        for s in tqdm(sources, desc=f"quantize {cfg.method}", unit="tensor", disable=not progress):
            if s.raw_qtype is not None and type_of[s.name] == s.raw_qtype:
                report.tensors[s.name] = {"type": s.raw_qtype.name, "method": "copied"}
                yield s.load_raw().numpy()
                continue
            w = s.load().reshape(s.shape)
            data, _ = tensor_quant.encode(w, type_of[s.name], importance.get(s.name))
            report.tensors[s.name] = {"type": type_of[s.name].name, "method": "imatrix-file" if cfg.imatrix_file else "rtn"}
            yield data
        return

    unsupported = nn.unsupported_reason(spec)
    if unsupported:
        raise Moeq2ggufError(f"--method {cfg.method} cannot calibrate {spec.family} yet ({unsupported}); "
                             "use --method rtn or --imatrix FILE for it")
    from moeq2gguf.calib.sources import calibration_windows
    windows = calibration_windows(adapter.reader.model_dir, cfg.calib, cfg.n_windows, cfg.ctx)
    sequential = cfg.method in ("gptq", "moequant")
    by_layer: dict[int | None, list[TensorSource]] = {}
    for s in sources:
        by_layer.setdefault(s.layer, []).append(s)
    head = [s for s in by_layer.get(None, []) if s.name == "token_embd.weight"]
    tail = [s for s in by_layer.get(None, []) if s.name != "token_embd.weight"]
    assert [s.name for s in sources] == [s.name for s in head + [t for b in range(spec.n_layers) for t in by_layer[b]] + tail]

    token_embd = head[0].load().reshape(head[0].shape)
    data, deq = tensor_quant.encode(token_embd, type_of[head[0].name], None)
    report.tensors[head[0].name] = {"type": type_of[head[0].name].name, "method": "rtn"}
    yield data
    # llama.cpp embeds by dequantizing rows of token_embd: the quantized model starts from those.
    x = nn.embed(windows, (deq if sequential else token_embd).to(device))
    del token_embd, deq

    bar = tqdm(total=spec.n_layers, desc=f"quantize {cfg.method}", unit="layer", disable=not progress)
    for bid in range(spec.n_layers):
        layer_sources = by_layer[bid]
        w = {k: v.to(device) for k, v in _layer_weights(layer_sources).items()}
        collector = StatsCollector(spec.n_experts, affinity=cfg.method == "moequant",
                                   full=cfg.method in ("gptq", "moequant"), device=device)
        x_float = _run_layer(x, w, spec, collector, cfg.batch_windows, bid)
        encoded, qweights = {}, {}
        # A second bar inside the layer, over its tensors counted in groups (a routed expert stack counts
        # E, any other tensor 1): the expert stacks are where a big model's GPTQ time goes.
        groups = [s.shape[0] if s.role == "expert" and len(s.shape) == 3 else 1 for s in layer_sources]
        inner = tqdm(total=sum(groups), desc=f"layer {bid}", unit="group", leave=False, position=1,
                     disable=not progress)
        for s, n_groups in zip(layer_sources, groups):
            key, qtype = s.name.split(".", 2)[2], type_of[s.name]
            inner.set_postfix_str(_short(s.name))   # the tensor being quantized
            if s.raw_qtype is not None and qtype == s.raw_qtype:
                # blocks the checkpoint already holds in a GGML format (GPT-OSS MXFP4 experts) are copied;
                # w[key] holds their exact values, which the next layers then see
                encoded[s.name], qweights[key] = s.load_raw().numpy(), w[key]
                report.tensors[s.name] = {"type": s.raw_qtype.name, "method": "copied"}
            else:
                encoded[s.name], qweights[key], info = tensor_quant.quantize_with_stats(
                    w[key], qtype, cfg.method, collector, nn.INPUT_OF.get(_short(s.name)), cfg.gptq)
                report.tensors[s.name] = info
                if info.get("coverage") is not None:
                    report.coverage[s.name] = info.pop("coverage")
            inner.update(n_groups)
        inner.close()
        x = _run_layer(x, qweights, spec, None, cfg.batch_windows, bid) if sequential else x_float
        del w, qweights, collector, x_float
        for s in layer_sources:
            yield encoded.pop(s.name)
        bar.update()
    bar.close()

    # final norm + head: the output projection is calibrated on the final normed hidden states
    tail_w = {s.name: s.load().reshape(s.shape).to(device) for s in tail}
    output_w = tail_w.get("output.weight")
    collector = StatsCollector(1, affinity=False, full=cfg.method in ("gptq", "moequant"), device=device)
    # llama-imatrix leaves the output projection out unless --process-output: so does --method imatrix
    if output_w is not None and cfg.method != "imatrix":
        for chunk in x.split(cfg.batch_windows):
            normed = nn.rms_norm(chunk, tail_w["output_norm.weight"], spec.rms_norm_eps)
            collector.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
    for s in tail:
        data, _, info = tensor_quant.quantize_with_stats(tail_w[s.name], type_of[s.name], cfg.method,
                                                         collector, "output" if s.name == "output.weight" else None, cfg.gptq)
        info.pop("coverage", None)
        report.tensors[s.name] = info
        yield data


def _run_layer(x: torch.Tensor, w: dict[str, torch.Tensor], spec, observer, batch: int, bid: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([nn.decoder_layer(chunk, w, spec, observer, bid=bid)[0] for chunk in x.split(batch)])
