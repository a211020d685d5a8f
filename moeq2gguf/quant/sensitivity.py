"""How much each quantizable tensor loses at each candidate GGML type: the bit allocator's input.

A plug-in of the float calibration pass (passes/calibration.py), layer by layer with one layer's weights in
memory, like llama-imatrix:
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
from types import SimpleNamespace

import gguf
import torch
from tqdm import tqdm

from moeq2gguf import methods, nn
from moeq2gguf.calib import corpus
from moeq2gguf.models.base import FamilyAdapter, TensorSource
from moeq2gguf.passes import expert_groups
from moeq2gguf.passes.calibration import BlockView, Plugin, float_pass
from moeq2gguf.passes.layers import Layers, input_of
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import GPTQConfig
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


def quantized_weights(w: torch.Tensor, qtype: Q, method: methods.Method, collector: StatsCollector, input_name: str,
                      gptq_cfg: GPTQConfig, weighted: bool = True) -> torch.Tensor:
    """The weights the runtime will compute with after `method` quantizes w to qtype (its own quantizer, without
    packing). weighted=False, or a method without statistics: plain RTN (the head under --method imatrix).
    Q8_0 is measured with RTN under every method: ggml's Q8_0 ignores importance, GPTQ gains little at
    8 bits, and Q8_0's 32-wide blocks make it GPTQ's slowest grid; the loss is then a slight over-estimate."""
    if qtype in tensor_quant.FLOAT_TYPES or qtype == Q.Q8_0 or not weighted or not method.calibrated:
        return tensor_quant.encode(w, qtype, None)[1]
    return method.simulate(w, qtype, collector, input_name, gptq_cfg)


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

    def scale_input(self, name: str, r: torch.Tensor) -> None:
        """The input was x and is x * r now (a transform of the block): both collectors' sums follow."""
        for collector in (self.method_stats, self.scaled):
            collector.scale_input(name, r)

    def loss_hessian(self, name: str) -> torch.Tensor:
        """S_g / N for every group of one input: [G, K, K] float64 (N cancels out of the ratios the
        allocator uses; it is there so that losses are per token)."""
        # unscaled inputs: the method's sums are plain sums of x x^T (token_weight None is never weighted)
        stats = self.scaled.inputs[name] if name in self.scaled.inputs else self.method_stats.inputs[name]
        return stats.weighted_xxt.to(torch.float64)


def tensor_losses(w: torch.Tensor, qtypes: Sequence[Q], method: methods.Method, observer: ScaledInputs, input_name: str,
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


class Sensitivity(Plugin):
    """The float pass's plug-in that measures every candidate's loss (module docstring): `losses` after the pass."""

    def __init__(self, spec, candidates: Mapping[str, Sequence[Q]], method: methods.Method, gptq: GPTQConfig,
                 tied: bool, device: torch.device | str = "cpu", batch: int = 8):
        self.spec, self.candidates, self.method, self.gptq, self.tied = spec, candidates, method, gptq, tied
        self.batch = batch
        self.device = torch.device(device)
        self.losses: dict[str, dict[str, float]] = {}
        self.n_tokens = 0
        self.token_embd: torch.Tensor | None = None
        self._observer: ScaledInputs | None = None
        self._warned = False

    def _new_observer(self, n_groups: int) -> ScaledInputs:
        method_stats = StatsCollector(n_groups, affinity=self.method.affinity, full=True, device=self.device)
        return ScaledInputs(method_stats, StatsCollector(n_groups, affinity=True, full=True, device=self.device))

    def embedding(self, token_embd: torch.Tensor, windows: torch.Tensor) -> None:
        self.n_tokens = windows.numel()
        name = "token_embd.weight"
        if name in self.candidates and not self.tied:
            counts = torch.bincount(windows.flatten(), minlength=token_embd.shape[0])
            self.losses[name] = embedding_losses(token_embd, self.candidates[name], counts)
        self.token_embd = token_embd if self.tied else None   # a tied token_embd is the head, measured there

    def observer(self, bid: int, weights: dict[str, torch.Tensor]) -> nn.Observer:
        if not self._warned:
            self._warned = warn_if_too_big(bid, weights, self.spec.n_experts, self.device)
        self._observer = self._new_observer(self.spec.n_experts)
        return self._observer

    def after_block(self, view: BlockView) -> None:
        observer, self._observer = self._observer, None
        for name, r in view.input_scales.items():
            if name in observer.method_stats.inputs:
                observer.scale_input(name, r)
        for key, w in view.weights.items():
            name = f"blk.{view.bid}.{key}"
            if name not in self.candidates:
                continue
            input_name = input_of(name)
            if input_name not in observer.method_stats.inputs:
                raise AssertionError(f"the calibration forward observed no input for {name}")
            self.losses[name] = tensor_losses(w, self.candidates[name], self.method, observer, input_name,
                                              self.n_tokens, self.gptq)

    def head(self, x: torch.Tensor, tail: dict[str, torch.Tensor]) -> None:
        name = "token_embd.weight" if self.tied else "output.weight"
        if name not in self.candidates:
            return
        observer = ScaledInputs(StatsCollector(1, affinity=False, full=True, device=self.device),
                                StatsCollector(1, affinity=True, full=True, device=self.device))
        for chunk in x.split(self.batch):
            normed = nn.rms_norm(chunk, tail["output_norm.weight"], self.spec.rms_norm_eps)
            observer.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
        weights = self.token_embd.to(self.device) if self.tied else tail[name]
        # as the quantization pass does: llama-imatrix (hence --method imatrix) leaves the head unweighted;
        # token_embd is always RTN
        weighted = self.method.calibrates_head and name == "output.weight"
        self.losses[name] = tensor_losses(weights, self.candidates[name], self.method, observer, "output", self.n_tokens,
                                          self.gptq, weighted)


def warn_if_too_big(bid: int, weights: dict[str, torch.Tensor], n_experts: int, device: torch.device) -> bool:
    """Warn (and say so) when measuring a layer is estimated not to fit the device: the measurement keeps every
    expert's statistics of a layer at once, twice (the method's and the loss's), where the quantization pass would take
    the experts in groups (passes/expert_groups.py, whose estimate this uses)."""
    stacks = [SimpleNamespace(name=k, shape=tuple(w.shape)) for k, w in weights.items()
              if w.dim() == 3 and k.endswith("_exps.weight")]
    if not stacks or n_experts < 2:
        return False
    stack_bytes, per_expert = expert_groups.layer_bytes(stacks, full_statistics=True)
    second = sum(expert_groups.F32 * k * k for k in {s.shape[2] for s in stacks})   # the loss's own Hessians
    need, free = stack_bytes + n_experts * (per_expert + second), expert_groups.free_bytes(device)
    if need <= expert_groups.BUDGET_FRACTION * free:
        return False
    log.warning("--target-size measures all %d experts of layer %d at once, about %.0f GiB, more than the %.0f GiB the "
                "%s has free: it may run out of memory (the quantization pass would take them in groups; this "
                "measurement does not yet); convert with --type MIX instead, or on a machine with more memory",
                n_experts, bid, need / 2**30, free / 2**30, device.type)
    return True


def measure(adapter: FamilyAdapter, sources: list[TensorSource], candidates: Mapping[str, Sequence[Q]],
            cfg, progress: bool = True, windows: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """{tensor name: {type name: predicted loss}} for every tensor in `candidates`: a float pass with only this
    plug-in (convert runs it inside its one pass, next to the other plug-ins)."""
    spec = adapter.spec
    if windows is None:
        from moeq2gguf.calib.sources import calibration_windows
        windows = calibration_windows(adapter.reader.model_dir, cfg.calib, cfg.n_windows, cfg.ctx)
    plugin = Sensitivity(spec, candidates, methods.get(cfg.method), cfg.gptq,
                         tied=not any(s.name == "output.weight" for s in sources), device=cfg.device,
                         batch=cfg.batch_windows)
    bar = tqdm(total=spec.n_layers, desc="sensitivity", unit="layer", disable=not progress)
    float_pass(Layers.of(sources, spec.n_layers), spec, windows, [plugin], "a size target", cfg.device,
               cfg.batch_windows, progress=lambda bid: bar.update())
    bar.close()
    return plugin.losses


def cache_dir() -> Path:
    root = os.environ.get("MOEQ2GGUF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moeq2gguf") / "sensitivity"


def _calib_fingerprint(source: str) -> str:
    if source in corpus.NAMED or source == "ebss":
        return source
    path = Path(source)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cache_key(model_dir, cfg, candidates: Mapping[str, Sequence[Q]], transforms: Mapping | None = None) -> Path:
    """The cache file of a measurement of this model with these settings, candidates and transforms (what was done to
    the weights before measuring: rotation and its seed, smoothing kinds), by this code."""
    from moeq2gguf.io.fingerprint import checkpoint_fingerprint, code_fingerprint
    key = json.dumps({"version": SENSITIVITY_VERSION, "model": checkpoint_fingerprint(model_dir),
                      "code": code_fingerprint(), "transforms": dict(transforms or {}),
                      "method": cfg.method, "calib": _calib_fingerprint(cfg.calib), "n_windows": cfg.n_windows,
                      "ctx": cfg.ctx, "gptq": asdict(cfg.gptq), "device": torch.device(cfg.device).type,
                      "candidates": {n: [q.name for q in c] for n, c in sorted(candidates.items())}}, sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def load_cached(path: Path) -> dict[str, dict[str, float]] | None:
    if path.is_file():
        log.info("sensitivity: reusing %s", path)
        return json.loads(path.read_text())
    return None


def store(path: Path, losses: dict[str, dict[str, float]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(losses, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("sensitivity: cannot cache to %s (%s)", path, exc)


def cached_measure(adapter: FamilyAdapter, sources: list[TensorSource], candidates: Mapping[str, Sequence[Q]],
                   cfg, progress: bool = True) -> dict[str, dict[str, float]]:
    """measure(), reusing an earlier measurement of the same model with the same settings."""
    path = cache_key(adapter.reader.model_dir, cfg, candidates, {"rotate": None, "smooth": []})
    cached = load_cached(path)
    if cached is not None:
        return cached
    result = measure(adapter, sources, candidates, cfg, progress)
    store(path, result)
    return result
