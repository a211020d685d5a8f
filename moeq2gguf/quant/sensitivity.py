"""How much each quantizable tensor loses at each candidate GGML type: the bit allocator's input.

One pass over the model, layer by layer with one layer's weights in memory, like llama-imatrix:
the calibration activations are propagated through the *float* layers, so every measurement is made
on the same inputs whatever types are chosen later (the real conversion, run afterwards with the
chosen types, propagates quantized activations as usual). For each tensor and candidate type the
tensor is quantized with the method's own quantizer (GPTQ on the method's Hessians for
gptq/moequant, ggml's importance-weighted search for imatrix, plain RTN for rtn) and its predicted
loss is the squared error it adds to its output, as that output reaches the residual stream,
averaged over the N calibration tokens:

    loss(W, type) = (1/N) sum_g tr((W_g - Q_g) S_g (W_g - Q_g)^T),   S_g = sum_t s_t^2 x_t x_t^T

over the tensor's groups g (the experts of a stacked [E, R, K] tensor; one group for a matrix) and
the tokens t that reach g, with s_t the factor the runtime scales that output by: the routing weight
a(t, e) for a routed expert (so an expert counts by how much the router uses it, and one it never
picks counts for nothing), the sigmoid gate for a gated shared expert, 1 otherwise. Weighting by
a(t, e)^2 rather than the token count is what makes the errors of one model's experts comparable
with another's: measured on the bundled models, the KLD per unit of count-weighted error of the
expert tensors differed 3 to 7 times between Mixtral (top-2 renormalised, mean a^2 0.38) and
Qwen2-MoE (top-4 of 16, mean a^2 0.077). token_embd (untied): the mean over calibration tokens of
the squared error of the embedded row, since llama.cpp embeds by dequantizing rows. A tied
token_embd is also the output head and is measured there instead. These losses live in each
linear's own output space: alloc.py puts them on one scale with a coefficient per tensor class.
Memory: the scaled inputs need a second set of Hessians for the routed and gated inputs of a layer.

Measurements are cached (the sensitivity of a model does not depend on the budget): under
$MOEQ2GGUF_CACHE/sensitivity, else ~/.cache/moeq2gguf/sensitivity, keyed by the checkpoint's
fingerprint, the method, the calibration source and size, the candidates and SENSITIVITY_VERSION.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from moeq2gguf import nn
from moeq2gguf.calib import corpus
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, TensorSource
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.engine import QuantConfig, _layer_weights, _run_layer, _short
from moeq2gguf.quant.gptq import GPTQConfig, gptq_quantize
from moeq2gguf.quant.stats import StatsCollector

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType

SENSITIVITY_VERSION = 2   # bump when the measurement changes: old cache entries are then ignored


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 3 else w.unsqueeze(0)


def weighted_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor, group_weight: torch.Tensor) -> float:
    """sum_g group_weight[g] * tr((W_g - Q_g) H_g (W_g - Q_g)^T); w, q [R, K] or [G, R, K], H [G, K, K]
    (float64 for the exact sums; pass it so to avoid a conversion per call)."""
    d = _groups(w).to(torch.float64) - _groups(q).to(torch.float64)
    per_group = (torch.bmm(d, H.to(torch.float64)) * d).sum((1, 2))
    return float((per_group * group_weight.to(torch.float64)).sum())


def quantized_weights(w: torch.Tensor, qtype: Q, method: str, collector: StatsCollector, input_name: str,
                      gptq_cfg: GPTQConfig, weighted: bool = True) -> torch.Tensor:
    """The weights the runtime will compute with after `method` quantizes w to qtype (the engine's
    quantizers, without packing). weighted=False: plain RTN (the head under --method imatrix).
    Q8_0 is measured with RTN under every method: ggml's Q8_0 ignores importance, GPTQ gains little at
    8 bits, and Q8_0's 32-wide blocks make it GPTQ's slowest grid; the loss is then a slight over-estimate."""
    if qtype in tensor_quant.FLOAT_TYPES or qtype == Q.Q8_0 or not weighted or method == "rtn":
        return tensor_quant.encode(w, qtype, None)[1]
    if method == "imatrix":
        return tensor_quant.encode(w, qtype, tensor_quant.imatrix_importance(collector, input_name))[1]
    from moeq2gguf.quant.grid import FormatGrid
    H, _ = collector.hessians(input_name, blend_rare=method == "moequant")
    grid = FormatGrid(qtype)
    grid.prepare(_groups(w))
    return gptq_quantize(_groups(w), H, grid, gptq_cfg)[0].reshape(w.shape)


class ScaledInputs:
    """An nn.Observer feeding the method's collector unchanged and, for inputs whose output the runtime
    scales per token (routed experts, a gated shared expert), a second collector with each token's
    weight squared: the S_g of the module docstring."""

    def __init__(self, method_stats: StatsCollector, scaled: StatsCollector):
        assert scaled.affinity and scaled.full
        self.method_stats, self.scaled = method_stats, scaled

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        self.method_stats.observe(name, x, token_weight, expert)
        if token_weight is not None:
            self.scaled.observe(name, x, token_weight.square(), expert)

    def loss_hessian(self, name: str) -> torch.Tensor:
        """S_g / N for every group of one input: [G, K, K] float64 (N cancels out of the ratios the
        allocator uses; it is there so that losses are per token)."""
        # unscaled inputs: the method's sums are plain sums of x x^T (token_weight None is never weighted)
        stats = self.scaled.inputs[name] if name in self.scaled.inputs else self.method_stats.inputs[name]
        return stats.weighted_xxt.to(torch.float64)


def tensor_losses(w: torch.Tensor, qtypes: Sequence[Q], method: str, observer: ScaledInputs, input_name: str,
                  n_tokens: int, gptq_cfg: GPTQConfig, weighted: bool = True) -> dict[str, float]:
    """Predicted loss (module docstring) of w at each type in qtypes."""
    S = observer.loss_hessian(input_name)
    ones = torch.full((S.shape[0],), 1.0 / n_tokens, dtype=torch.float64)
    return {q.name: weighted_error(w, quantized_weights(w, q, method, observer.method_stats, input_name, gptq_cfg, weighted),
                                   S, ones)
            for q in qtypes}


def embedding_losses(w: torch.Tensor, qtypes: Sequence[Q], token_counts: torch.Tensor) -> dict[str, float]:
    """Mean squared error of the embedded rows over the calibration tokens (token_embd is RTN)."""
    freq = token_counts.to(torch.float64) / token_counts.sum()
    used = freq > 0   # rows of tokens the calibration text never holds count for nothing: skip them
    w = w[used]
    out = {}
    for q in qtypes:
        d = w.to(torch.float64) - tensor_quant.encode(w, q, None)[1].to(torch.float64)
        out[q.name] = float(d.pow(2).sum(-1) @ freq[used])
    return out


def measure(adapter: FamilyAdapter, sources: list[TensorSource], candidates: Mapping[str, Sequence[Q]],
            cfg: QuantConfig, progress: bool = True) -> dict[str, dict[str, float]]:
    """{tensor name: {type name: predicted loss}} for every tensor in `candidates`."""
    spec = adapter.spec
    unsupported = nn.unsupported_reason(spec)
    if unsupported:
        raise Moeq2ggufError(f"a size target needs the calibration forward to measure each tensor's sensitivity, which cannot "
                             f"run {spec.family} yet ({unsupported}); pick a fixed --type instead")
    from moeq2gguf.calib.sources import calibration_windows
    windows = calibration_windows(adapter.reader.model_dir, cfg.calib, cfg.n_windows, cfg.ctx)
    n_tokens = windows.numel()
    device = torch.device(cfg.device)
    by_layer: dict[int | None, list[TensorSource]] = {}
    for s in sources:
        by_layer.setdefault(s.layer, []).append(s)
    outside = {s.name: s for s in by_layer.get(None, [])}
    tied = "output.weight" not in outside
    out: dict[str, dict[str, float]] = {}

    embd = outside["token_embd.weight"]
    token_embd = embd.load().reshape(embd.shape)
    if embd.name in candidates and not tied:
        counts = torch.bincount(windows.flatten(), minlength=embd.shape[0])
        out[embd.name] = embedding_losses(token_embd, candidates[embd.name], counts)
    x = nn.embed(windows, token_embd.to(device))
    del token_embd

    for bid in tqdm(range(spec.n_layers), desc="sensitivity", unit="layer", disable=not progress):
        layer_sources = by_layer[bid]
        w = {k: v.to(device) for k, v in _layer_weights(layer_sources).items()}
        observer = ScaledInputs(StatsCollector(spec.n_experts, affinity=cfg.method == "moequant", full=True, device=device),
                                StatsCollector(spec.n_experts, affinity=True, full=True, device=device))
        x_next = _run_layer(x, w, spec, observer, cfg.batch_windows, bid)
        for s in layer_sources:
            if s.name not in candidates:
                continue
            input_name = nn.INPUT_OF.get(_short(s.name))
            if input_name not in observer.method_stats.inputs:
                raise AssertionError(f"the calibration forward observed no input for {s.name}")
            out[s.name] = tensor_losses(w[s.name.split(".", 2)[2]], candidates[s.name], cfg.method, observer, input_name,
                                        n_tokens, cfg.gptq)
        x = x_next
        del w, observer, x_next

    head = outside.get("output.weight", embd)
    if head.name in candidates:
        norm = outside["output_norm.weight"].load().reshape(-1).to(device)
        observer = ScaledInputs(StatsCollector(1, affinity=False, full=True, device=device),
                                StatsCollector(1, affinity=True, full=True, device=device))
        for chunk in x.split(cfg.batch_windows):
            normed = nn.rms_norm(chunk, norm, spec.rms_norm_eps)
            observer.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
        weights = head.load().reshape(head.shape).to(device)
        # as the engine does: llama-imatrix (hence --method imatrix) leaves the head unweighted; token_embd is always RTN
        weighted = cfg.method != "imatrix" and head.name == "output.weight"
        out[head.name] = tensor_losses(weights, candidates[head.name], cfg.method, observer, "output", n_tokens, cfg.gptq,
                                       weighted)
    return out


def cache_dir() -> Path:
    root = os.environ.get("MOEQ2GGUF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moeq2gguf") / "sensitivity"


def _calib_fingerprint(source: str) -> str:
    if source in corpus.SPLITS or source == "ebss":
        return source
    path = Path(source)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cached_measure(adapter: FamilyAdapter, sources: list[TensorSource], candidates: Mapping[str, Sequence[Q]],
                   cfg: QuantConfig, progress: bool = True) -> dict[str, dict[str, float]]:
    """measure(), reusing an earlier measurement of the same model with the same settings."""
    from moeq2gguf.calib.ebss import model_fingerprint
    key = json.dumps({"version": SENSITIVITY_VERSION, "model": model_fingerprint(adapter.reader.model_dir),
                      "method": cfg.method, "calib": _calib_fingerprint(cfg.calib), "n_windows": cfg.n_windows,
                      "ctx": cfg.ctx, "gptq": asdict(cfg.gptq), "device": torch.device(cfg.device).type,
                      "candidates": {n: [q.name for q in c] for n, c in sorted(candidates.items())}}, sort_keys=True)
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        log.info("sensitivity: reusing %s", path)
        return json.loads(path.read_text())
    result = measure(adapter, sources, candidates, cfg, progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("sensitivity: cannot cache to %s (%s)", path, exc)
    return result
