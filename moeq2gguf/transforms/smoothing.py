"""Smoothing folded into the weights, for stock llama.cpp (EAQuant, docs/METHODS.md section 6).

Both scale one axis of a linear's input by s and its reader's weights by the inverse, so every output of
the float model is unchanged; quantizing the scaled weights moves activation outliers into the weights,
where the quantizer's importance (imatrix / GPTQ Hessian) sees them per channel.

aggregate (smoothing aggregation): per routed expert e and FFN input channel j (x: the FFN input after the
FFN norm), over the tokens routed to e,
    s(e, j) = max_t |x(e, j)|^alpha / max(max_i |W_gate(e)[i, j]|, max_i |W_up(e)[i, j]|)^(1 - alpha)
with alpha = 0.6; the shared expert (every token) and a dense layer's FFN count as one expert each. One s per
layer, s_j = max_e s(e, j), folds into the norm, which every FFN reader shares:
    FFN norm weight g -> g / s;   router, shared-expert gate, shared / routed / dense gate and up  W -> W diag(s)
(GGUF [.., out, n_embd]: columns), since (x/rms * g/s) (W diag(s))^T = (x/rms * g) W^T. Reader biases act
after the matmul and stay. GPT-OSS's FFN norm is post_attention_norm (as in rotate.py).

down (per-expert down-projection scaling): per expert e and channel j of the down input h = silu(gate) * up,
    s(e, j) = max_t |h(e, j)|^alpha / max_i |W_down(e)[i, j]|^(1 - alpha)
    W_up(e) rows / s(e),   W_down(e) columns * s(e)
exact because silu(g) * (u / s) = h / s. The shared expert and a dense FFN get the same, each on its own.
GPT-OSS's swiglu_oai computes (clamp(u, -limit, limit) + 1) * act(g), not linear in u: refused.

Each s is divided by its geometric mean over the channels with evidence (a common factor changes no output and,
with block scales, no quantization: it only keeps magnitudes near 1) and clamped to [1/CLAMP, CLAMP]. A channel
without evidence (unrouted expert, all-zero activations or weights) gets s = 1 (for aggregate: when no expert
has evidence).

Order with the other transforms: after the residual rotation (convert.py), whose norm folding would otherwise
cancel the aggregate smoothing exactly (g / s folded into W diag(s) is W diag(g)); so both are measured on
the rotated model, whose weights are the ones quantized. aggregate before down: aggregate's weight maxima are
of gate/up as the checkpoint (or rotation) gives them, and down's statistics (h, W_down) are unchanged by
aggregate in float; both come from one calibration pass.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import gguf
import torch

from moeq2gguf import nn
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec, TensorSource
from moeq2gguf.passes.calibration import BlockView, Plugin
from moeq2gguf.transforms import rotate
from moeq2gguf.transforms.expert_smoothing import ALPHA, smoothing_scales

log = logging.getLogger(__name__)

KINDS = ("aggregate", "down")             # stock llama.cpp; "per-expert" is in patched.py
PATCHED_KINDS = ("per-expert",)
CLAMP = 1e3
KEY = "moeq2gguf.smoothing"               # GGUF string: the kinds applied, e.g. "aggregate,down"
ALPHA_KEY = "moeq2gguf.smoothing_alpha"   # GGUF float32
OBSERVED = ("exps_in", "shexp_in", "dense_in", "exps_down", "shexp_down", "dense_down")
# the FFN's parts: statistic name -> (gate, up, down) GGUF names without blk.N. and .weight
PARTS = {"exps": ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
         "shexp": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
         "dense": ("ffn_gate", "ffn_up", "ffn_down")}
KNOWN = (rotate.READS_ATTN_NORM | rotate.READS_FFN_NORM | rotate.WRITES | rotate.UNTOUCHED
         | {rotate.ATTN_NORM, "ffn_norm", *rotate.FFN_NORM.values()})


def parse(smooth: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--smooth 'aggregate,down' -> (stock kinds in the order applied, patched kinds)."""
    if smooth is None:
        return (), ()
    parts = [p.strip() for p in str(smooth).split(",")]
    known = KINDS + PATCHED_KINDS
    for p in parts:
        if p not in known:
            raise Moeq2ggufError(f"--smooth {smooth}: {p!r} is unknown; give one of {', '.join(known)}, or "
                                 "aggregate,down for both")
    if len(set(parts)) != len(parts):
        raise Moeq2ggufError(f"--smooth {smooth} names a kind twice; give each once, e.g. aggregate,down")
    stock, patched = tuple(k for k in KINDS if k in parts), tuple(k for k in PATCHED_KINDS if k in parts)
    if stock and patched:
        raise Moeq2ggufError(f"--smooth {smooth}: per-expert (patched llama.cpp) does not combine with aggregate / "
                             "down in this version; choose per-expert alone, or aggregate and/or down")
    return stock, patched


class FFNAbsMax:
    """Observer: max |x| per input channel of the FFN's linears: [E, n] for the routed experts (over the tokens
    routed to each), [1, n] for the shared expert and a dense FFN (every token)."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.absmax: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        if name not in OBSERVED or x.shape[0] == 0:
            return
        if name not in self.absmax:
            self.absmax[name] = torch.zeros(self.n_experts if name.startswith("exps") else 1, x.shape[-1])
        row = 0 if expert is None else expert
        self.absmax[name][row] = torch.maximum(self.absmax[name][row], x.abs().amax(0).to(torch.float32).cpu())


def raw_scales(absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s [.., n] by the EAQuant formula, and where it has evidence (both maxima finite and > 0)."""
    valid = (absmax > 0) & (weight_absmax > 0) & absmax.isfinite() & weight_absmax.isfinite()
    return smoothing_scales(absmax.nan_to_num(0.0), weight_absmax.nan_to_num(0.0), alpha), valid


def normalize(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """s over its last axis divided by its geometric mean over the valid channels, clamped to [1/CLAMP, CLAMP];
    1 where not valid (and for a row with no valid channel)."""
    logs = torch.where(valid, s.to(torch.float64).clamp_min(1e-30).log(), 0.0)
    mean = logs.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    out = (logs - mean).exp().clamp(1.0 / CLAMP, CLAMP)
    return torch.where(valid, out, 1.0).to(torch.float32)


def aggregate_scales(groups: list[tuple[torch.Tensor, torch.Tensor]], alpha: float = ALPHA) -> torch.Tensor:
    """groups: (max|x| [E, n], max over gate/up rows of |W| [E, n]) per FFN part -> one s [n], max over every
    expert with evidence, normalized."""
    s, valid = zip(*(raw_scales(a, w, alpha) for a, w in groups))
    s, valid = torch.cat(s), torch.cat(valid)
    return normalize(torch.where(valid, s, 0.0).amax(0), valid.any(0))


def down_scales(absmax: torch.Tensor, down_absmax: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """max|h| [E, ff] and max over the down rows of |W_down| [E, ff] -> s [E, ff], per expert normalized."""
    return normalize(*raw_scales(absmax, down_absmax, alpha))


def _split(name: str) -> tuple[int | None, str, str]:
    """blk.3.ffn_up_exps.weight -> (3, ffn_up_exps, weight); output.weight -> (None, output, weight)"""
    parts = name.split(".")
    if parts[0] == "blk":
        return int(parts[1]), ".".join(parts[2:-1]), parts[-1]
    return None, ".".join(parts[:-1]), parts[-1]


def _load(source: TensorSource) -> torch.Tensor:
    return source.load().reshape(source.shape).to(torch.float32)


def _replace(source: TensorSource, load: Callable[[], torch.Tensor]) -> TensorSource:
    # new values: raw GGML blocks the checkpoint held (GPT-OSS MXFP4 experts) no longer describe them
    return dataclasses.replace(source, load=load, raw_qtype=None, load_raw=None)


def _layers(sources: list[TensorSource]) -> dict[int, dict[str, TensorSource]]:
    """bid -> {'ffn_up_exps.weight': source, ...}"""
    out: dict[int, dict[str, TensorSource]] = {}
    for s in sources:
        if s.layer is not None:
            out.setdefault(s.layer, {})[s.name.split(".", 2)[2]] = s
    return out


def _aggregate_scale(bid: int, keys, load: Callable[[str], torch.Tensor], stats: FFNAbsMax, spec: ModelSpec,
                     alpha: float) -> torch.Tensor | None:
    """Block bid's s [n_embd] (None: no FFN part to smooth); keys: the block's weight names without blk.N.,
    load(key): that weight in float32."""
    ffn_norm = rotate.FFN_NORM.get(spec.gguf_arch, "ffn_norm")
    for name in keys:
        base = name.rsplit(".", 1)[0]
        if base not in KNOWN:
            raise Moeq2ggufError(f"--smooth aggregate does not know whether blk.{bid}.{name} of the "
                                 f"{spec.gguf_arch} architecture reads the FFN input; convert without it")
    if f"{ffn_norm}.weight" not in keys:
        raise Moeq2ggufError(f"--smooth aggregate folds 1/s into the FFN input norm, and layer {bid} of the "
                             f"{spec.gguf_arch} file has no {ffn_norm}.weight; convert without it")
    if "ffn_gate_up_exps.weight" in keys:
        raise Moeq2ggufError("--smooth does not handle fused ffn_gate_up_exps tensors; convert without --smooth")
    groups = []
    for part, (gate, up, _) in PARTS.items():
        if f"{up}.weight" not in keys:
            continue
        a = stats.absmax.get(f"{part}_in")
        wmax = torch.maximum(load(f"{gate}.weight").abs().amax(-2), load(f"{up}.weight").abs().amax(-2))
        wmax = wmax if wmax.dim() == 2 else wmax[None]
        groups.append((a if a is not None else torch.zeros_like(wmax), wmax))
    return aggregate_scales(groups, alpha) if groups else None


def aggregate(sources: list[TensorSource], spec: ModelSpec, stats: dict[int, FFNAbsMax],
              alpha: float = ALPHA) -> list[TensorSource]:
    """The FFN norm weights / s and every FFN reader's columns * s, s per layer (module docstring)."""
    ffn_norm = rotate.FFN_NORM.get(spec.gguf_arch, "ffn_norm")
    scales: dict[int, torch.Tensor] = {}
    for bid, tensors in _layers(sources).items():
        s = _aggregate_scale(bid, tensors.keys(), lambda k, t=tensors: _load(t[k]), stats[bid], spec, alpha)
        if s is not None:
            scales[bid] = s

    out = []
    for s in sources:
        bid, base, suffix = _split(s.name)
        if bid not in scales or suffix != "weight":
            out.append(s)
        elif base == ffn_norm:
            out.append(_replace(s, lambda s=s, bid=bid: _load(s) / scales[bid]))
        elif base in rotate.READS_FFN_NORM:
            out.append(_replace(s, lambda s=s, bid=bid: _load(s) * scales[bid]))
        else:
            out.append(s)
    _log("aggregate", alpha, scales)
    return out


def aggregate_block(view: BlockView, spec: ModelSpec, stats: FFNAbsMax, alpha: float = ALPHA) -> None:
    """aggregate() on one block's weights in the float pass: the view gets the smoothed weights, and the inputs
    the FFN norm feeds scale by 1/s."""
    w = view.weights
    s = _aggregate_scale(view.bid, w.keys(), lambda k: w[k].to(torch.float32), stats, spec, alpha)
    if s is None:
        return
    ffn_norm = rotate.FFN_NORM.get(spec.gguf_arch, "ffn_norm")
    for key in list(w):
        base, suffix = key.rsplit(".", 1)
        if suffix == "weight" and base == ffn_norm:
            w[key] = w[key].to(torch.float32) / s.to(w[key].device)
        elif suffix == "weight" and base in rotate.READS_FFN_NORM:
            w[key] = w[key].to(torch.float32) * s.to(w[key].device)
    for part, (_, up, _) in PARTS.items():
        if f"{up}.weight" in w:
            _compose(view, f"{part}_in", (1.0 / s)[None])


def _compose(view: BlockView, name: str, r: torch.Tensor) -> None:
    view.input_scales[name] = r if name not in view.input_scales else view.input_scales[name] * r


def _down_scales(keys, load: Callable[[str], torch.Tensor], stats: FFNAbsMax,
                 alpha: float) -> dict[str, torch.Tensor]:
    """Per FFN part of one block: s [E, ff] or [ff]."""
    if "ffn_gate_up_exps.weight" in keys:
        raise Moeq2ggufError("--smooth does not handle fused ffn_gate_up_exps tensors; convert without --smooth")
    scales = {}
    for part, (_, up, dn) in PARTS.items():
        if f"{up}.weight" not in keys:
            continue
        w = load(f"{dn}.weight").abs().amax(-2)   # [E, n_embd, ff] -> [E, ff]; [n_embd, ff] -> [ff]
        a = stats.absmax.get(f"{part}_down")
        a = a if a is not None else torch.zeros(1, w.shape[-1])
        scales[part] = down_scales(a if w.dim() == 2 else a[0], w, alpha)
    return scales


def down(sources: list[TensorSource], spec: ModelSpec, stats: dict[int, FFNAbsMax],
         alpha: float = ALPHA) -> list[TensorSource]:
    """Per expert (and shared expert, dense FFN): up rows (and up bias) / s, down columns * s."""
    check(spec, ("down",))
    scales: dict[tuple[int, str], torch.Tensor] = {}   # (bid, part) -> s [E, ff] or [ff]
    for bid, tensors in _layers(sources).items():
        for part, s in _down_scales(tensors.keys(), lambda k, t=tensors: _load(t[k]), stats[bid], alpha).items():
            scales[bid, part] = s

    of = {name: part for part, names in PARTS.items() for name in names}
    out = []
    for s in sources:
        bid, base, suffix = _split(s.name)
        part = of.get(base)
        if (bid, part) not in scales:
            out.append(s)
        elif base == PARTS[part][1]:     # up: weight rows [.., ff, n_embd] and bias [.., ff] / s
            scale = scales[bid, part] if suffix == "bias" else scales[bid, part][..., None]
            out.append(_replace(s, lambda s=s, scale=scale: _load(s) / scale))
        elif base == PARTS[part][2] and suffix == "weight":   # down [.., n_embd, ff]: columns * s
            scale = scales[bid, part]
            out.append(_replace(s, lambda s=s, scale=scale: _load(s) * scale[..., None, :]))
        else:
            out.append(s)
    _log("down", alpha, scales)
    return out


def down_block(view: BlockView, spec: ModelSpec, stats: FFNAbsMax, alpha: float = ALPHA) -> None:
    """down() on one block's weights in the float pass: up rows / s, down columns * s, down inputs scale by 1/s."""
    w = view.weights
    for part, s in _down_scales(w.keys(), lambda k: w[k].to(torch.float32), stats, alpha).items():
        _, up, dn = PARTS[part]
        s = s.to(w[f"{up}.weight"].device)
        w[f"{up}.weight"] = w[f"{up}.weight"].to(torch.float32) / s[..., None]
        if f"{up}.bias" in w:
            w[f"{up}.bias"] = w[f"{up}.bias"].to(torch.float32) / s
        w[f"{dn}.weight"] = w[f"{dn}.weight"].to(torch.float32) * s[..., None, :]
        _compose(view, f"{part}_down", 1.0 / (s if s.dim() == 2 else s[None]))


def _log(kind: str, alpha: float, scales: dict) -> None:
    if scales:
        lo = min(float(s.min()) for s in scales.values())
        hi = max(float(s.max()) for s in scales.values())
        log.info("--smooth %s (alpha %.2f): %d scale vectors, s in [%.3g, %.3g]", kind, alpha, len(scales), lo, hi)


def check(spec: ModelSpec, kinds: tuple[str, ...]) -> None:
    """Refuse a kind the family's FFN does not allow exactly, before any calibration pass."""
    if "down" in kinds and spec.expert_activation != "silu":
        raise Moeq2ggufError(f"--smooth down needs an expert activation linear in up (silu(gate) * up); the "
                             f"{spec.gguf_arch} experts use {spec.expert_activation} ((clamp(up, -limit, limit) + 1) * "
                             "act(gate)), where up / s does not give h / s; use --smooth aggregate")


class Smoothing(Plugin):
    """--smooth aggregate / down as a plug-in of the float calibration pass: each block's FFN maxima; with
    transform_blocks (a later plug-in measures the smoothed model), the block is smoothed in the pass too.
    apply() then gives the smoothed sources (kinds in the order applied)."""

    def __init__(self, spec: ModelSpec, kinds: tuple[str, ...], alpha: float = ALPHA, transform_blocks: bool = False):
        check(spec, kinds)
        self.spec, self.kinds, self.alpha, self.transform_blocks = spec, kinds, alpha, transform_blocks
        self.stats: dict[int, FFNAbsMax] = {}

    def observer(self, bid: int, weights: dict[str, torch.Tensor]) -> nn.Observer:
        self.stats[bid] = FFNAbsMax(self.spec.n_experts)
        return self.stats[bid]

    def after_block(self, view: BlockView) -> None:
        if self.transform_blocks:
            for kind in self.kinds:
                {"aggregate": aggregate_block, "down": down_block}[kind](view, self.spec, self.stats[view.bid], self.alpha)

    def apply(self, sources: list[TensorSource]) -> list[TensorSource]:
        for kind in self.kinds:
            sources = {"aggregate": aggregate, "down": down}[kind](sources, self.spec, self.stats, self.alpha)
        return sources


def add_metadata(writer: gguf.GGUFWriter, kinds: tuple[str, ...], alpha: float = ALPHA) -> None:
    writer.add_string(KEY, ",".join(kinds))
    writer.add_float32(ALPHA_KEY, alpha)
