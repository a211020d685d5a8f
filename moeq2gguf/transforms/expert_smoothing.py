"""Per-expert input smoothing (EAQuant, docs/METHODS.md sections 6 and 8), for the patched llama.cpp.

Per routed expert e and input channel j, from a float calibration pass over the tokens routed to e:
    s(e, j) = max_t |x(e, j)|^alpha / max(max_i |W_gate(e)[i, j]|, max_i |W_up(e)[i, j]|)^(1 - alpha)
with alpha = 0.6. The file holds W_gate(e) diag(s_e) and W_up(e) diag(s_e) (columns scaled; a fused
ffn_gate_up_exps alike) and blk.N.ffn_exps_smooth = r_e = 1/s_e, F32 [E, n_embd] (GGUF {n_embd, E}); the
patched llama.cpp feeds expert e the input x * r_e (runtime_patches/), so every output is unchanged in float:
(x diag(r_e)) (W diag(s_e))^T = x W^T. Quantizing W diag(s_e) moves the activation outliers of channel j
into the weights of the experts that see them, per expert, which the stock-compatible aggregate
smoothing (one s over all experts, folded into the norm) cannot do.

Where a channel has no evidence (an expert no calibration token reached, a channel whose activations or
weights are all zero), s = 1. The quantizer's statistics of the expert input must then be of x * r_e:
nn.moe applies ffn_exps_smooth when the layer's weights carry it, so the calibration forward sees the
scaled input, as llama-imatrix on the patched runtime would.

The file announces it with `<arch>.expert_smoothing = true`; stock llama.cpp has no use for the
ffn_exps_smooth tensors and refuses the file ("wrong number of tensors"), never running it unsmoothed.
"""
from __future__ import annotations

import dataclasses
import logging

import gguf
import torch

from moeq2gguf import nn
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec, TensorSource
from moeq2gguf.passes.calibration import BlockView, Plugin, float_pass
from moeq2gguf.passes.layers import Layers

log = logging.getLogger(__name__)

ALPHA = 0.6
SMOOTH = "ffn_exps_smooth"                 # GGUF tensor blk.N.ffn_exps_smooth (no .weight: never quantized)
KEY = "{arch}.expert_smoothing"            # GGUF bool
READERS = tuple(gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.")
                for t in (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP, gguf.MODEL_TENSOR.FFN_GATE_UP_EXP))


class ExpertAbsMax:
    """Observer: per routed expert, max |x| per input channel of the expert input (exps_in)."""

    def __init__(self, n_experts: int, n_embd: int):
        self.absmax = torch.zeros(n_experts, n_embd, dtype=torch.float32)
        self.count = torch.zeros(n_experts, dtype=torch.int64)

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        if name != "exps_in" or expert is None or x.shape[0] == 0:
            return
        self.absmax[expert] = torch.maximum(self.absmax[expert], x.abs().amax(0).to(torch.float32).cpu())
        self.count[expert] += x.shape[0]


def smoothing_scales(absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s [E, n] from max|x| [E, n] and max over the gate/up rows of |W| [E, n]; 1 where either is zero."""
    if not 0.0 <= alpha <= 1.0:
        raise Moeq2ggufError(f"smoothing alpha {alpha} is outside [0, 1]; the EAQuant default is {ALPHA}")
    a, w = absmax.to(torch.float64), weight_absmax.to(torch.float64)
    valid = (a > 0) & (w > 0)
    s = a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1.0 - alpha)
    return torch.where(valid, s, torch.ones_like(s)).to(torch.float32)


def _split(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    return (int(parts[1]), ".".join(parts[2:])) if parts[0] == "blk" else (None, name)


class ExpertInputMaxima(Plugin):
    """--smooth per-expert as a plug-in of the float calibration pass: per MoE layer, the max |x| of every
    expert's input over the tokens routed to it (`stats` after the pass, for smooth_sources). transform_blocks (a
    later plug-in measures the smoothed model: the size allocator's sensitivity): each block is also smoothed in
    the pass, its gate/up weights scaled and the expert input's scale r_e recorded (passes/calibration.py)."""

    def __init__(self, spec: ModelSpec, alpha: float = ALPHA, transform_blocks: bool = False):
        self.spec, self.alpha, self.transform_blocks = spec, alpha, transform_blocks
        self.stats: dict[int, ExpertAbsMax] = {}

    def observer(self, bid: int, weights: dict[str, torch.Tensor]) -> nn.Observer | None:
        if "ffn_gate_inp.weight" not in weights:
            return None
        self.stats[bid] = ExpertAbsMax(self.spec.n_experts, self.spec.hidden_size)
        return self.stats[bid]

    def after_block(self, view: BlockView) -> None:
        if self.transform_blocks and view.bid in self.stats:
            smooth_block(view, self.stats[view.bid], self.alpha)


def weight_absmax(readers: list[torch.Tensor]) -> torch.Tensor:
    """max |W| over the rows of every gate/up stack [E, R, n] of one layer: [E, n] float32."""
    return torch.stack([w.abs().amax(-2).to(torch.float32) for w in readers]).amax(0)


def smooth_block(view: BlockView, stats: ExpertAbsMax, alpha: float = ALPHA) -> None:
    """Smooth one block of the float pass as smooth_sources smooths the file: the gate/up stacks times s_e, and the
    experts' input scaled by r_e = 1/s_e."""
    keys = [f"{r}.weight" for r in READERS if f"{r}.weight" in view.weights]
    s = smoothing_scales(stats.absmax, weight_absmax([view.weights[k].cpu() for k in keys]), alpha)
    for k in keys:
        w = view.weights[k]
        view.weights[k] = w * s[:, None, :].to(w.device, torch.float32)
    r = 1.0 / s
    view.input_scales["exps_in"] = r if "exps_in" not in view.input_scales else view.input_scales["exps_in"] * r


def expert_input_absmax(sources: list[TensorSource], spec: ModelSpec, windows: torch.Tensor, batch: int = 8,
                        device: str = "cpu") -> dict[int, ExpertAbsMax]:
    """A float pass of the model given by `sources` over token windows [N, L] with only this plug-in."""
    plugin = ExpertInputMaxima(spec)
    float_pass(Layers.of(sources, spec.n_layers), spec, windows, [plugin], "--smooth per-expert", device, batch)
    return plugin.stats


def smooth_sources(sources: list[TensorSource], spec: ModelSpec, stats: dict[int, ExpertAbsMax],
                   alpha: float = ALPHA) -> list[TensorSource]:
    """Gate/up expert columns times s_e, and blk.N.ffn_exps_smooth (r_e = 1/s_e) after each layer's last reader.
    stats is read when a tensor is loaded, not before: convert passes the dict the float pass is still to fill."""
    readers: dict[int, list[TensorSource]] = {}
    for s in sources:
        bid, base = _split(s.name)
        if bid is not None and base in tuple(f"{r}.weight" for r in READERS):
            readers.setdefault(bid, []).append(s)
    if not readers:
        raise Moeq2ggufError("--smooth per-expert: the model has no routed expert gate/up tensors to smooth")
    scales: dict[int, torch.Tensor] = {}

    def scale_of(bid: int) -> torch.Tensor:
        # computed once per layer, from the unscaled gate/up weights (each load() of a new source reads them)
        if bid not in scales:
            if bid not in stats:
                raise Moeq2ggufError(f"--smooth per-expert: the calibration pass routed no tokens through layer {bid}'s "
                                     f"experts (layers seen: {sorted(stats)})")
            wmax = weight_absmax([r.load().reshape(r.shape) for r in readers[bid]])
            scales[bid] = smoothing_scales(stats[bid].absmax, wmax, alpha)
            if len(scales) == len(readers):
                _log_unrouted(stats, alpha, len(readers))
        return scales[bid]

    last = {bid: rs[-1].name for bid, rs in readers.items()}
    out: list[TensorSource] = []
    for s in sources:
        bid, _ = _split(s.name)
        if bid in readers and any(s is r for r in readers[bid]):
            def load(s: TensorSource = s, bid: int = bid) -> torch.Tensor:
                return s.load().reshape(s.shape) * scale_of(bid)[:, None, :].to(torch.float32)
            out.append(dataclasses.replace(s, load=load, raw_qtype=None, load_raw=None))
            if s.name == last[bid]:
                n_experts, n_in = s.shape[0], s.shape[-1]
                out.append(TensorSource(f"blk.{bid}.{SMOOTH}", (n_experts, n_in), "norm",
                                        lambda bid=bid: 1.0 / scale_of(bid), layer=bid))
        else:
            out.append(s)
    return out


def _log_unrouted(stats: dict[int, ExpertAbsMax], alpha: float, n_layers: int) -> None:
    unrouted = {bid: int((st.count == 0).sum()) for bid, st in stats.items() if (st.count == 0).any()}
    log.info("per-expert smoothing (alpha %.2f) of %d MoE layers; experts no calibration token reached keep s = 1: %s",
             alpha, n_layers, unrouted or "none")


def add_metadata(writer: gguf.GGUFWriter, arch: str) -> None:
    writer.add_bool(KEY.format(arch=arch), True)
