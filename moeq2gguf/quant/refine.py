"""--refine: after GPTQ of a decoder layer, tune its rounding and block scales against the float layer's output
(issue 24; AutoRound's signed gradient descent, docs/METHODS.md section 11).

What moves, in every K-quant tensor (Q2_K..Q6_K, what the K mixes are made of):
- each code: code = clamp(round(u + V), format range), u = the weight as GPTQ's walk left it (after the error feedback
  of the earlier columns) over its block scale, V in [-0.5, 0.5] per weight, starting at 0 (GPTQ's codes exactly): a
  weight GPTQ rounded near a boundary flips first;
- each super-block's fp16 scale d (one per row and 256 columns): d' = fp16(d * (1 + a)), a in [-scale_range,
  scale_range] per block, starting at 0. The sub-block scales (6 or 8 bits) and the mins stay GPTQ's; u is taken over
  the moving scale, so codes follow it.
The result is in the same format and the same type mix, and every value is exactly what the runtime decodes (d * sc in
float32, as quant/grid.py; round and the fp16 cast pass their gradient straight through). Other tensors (i-quants,
legacy formats, Q8_0, floats) keep GPTQ's result.

Loss, on the layer's calibration inputs (the quantized model's hidden states, as GPTQ sees them):
  ||layer_q(x) - layer_f(x)||^2 / ||layer_f(x) - x||^2   (the output error relative to what the layer adds; routed
  experts count by their routing weights, as the layer sums them: AGQ's weighting)
+ routing_weight * KL(router_{l+1}(layer_f(x)) || router_{l+1}(layer_q(x)))   (EAQuant's routing consistency: the next
  layer's attention and router run in float on both outputs; the last layer's term is the output logits')
Each step takes one batch of windows in turn; V moves by lr * sign(gradient), lr decaying linearly from 1 / steps.
Rare experts: an expert's codes get gradient only from the tokens routed to it, so one that no calibration token
reaches keeps GPTQ's codes (from the pooled Hessian) and one with few tokens moves little.
The state (V and the scale factors) with the lowest loss over all batches, evaluated a few times per run, is kept
(AutoRound keeps its best iteration; GPTQ's own codes and scales are the first candidate, so the loss never rises).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from moeq2gguf import nn
from moeq2gguf.formats.k_common import ScaleMinFormat, SignedScaleFormat


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 0                 # 0: no refinement
    routing_weight: float = 1.0    # weight of the routing-consistency term
    scale_range: float = 0.2       # each block scale moves by a factor in [1 - r, 1 + r]; 0: codes only
    scale_lr_ratio: float = 0.05   # the scales' step over the offsets' (a 1% scale change moves a large code by ~0.3)
    lr: float | None = None        # default 1 / steps

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"--refine {self.steps}: give a number of steps >= 0")
        if self.routing_weight < 0:
            raise ValueError(f"--refine-routing {self.routing_weight} must be >= 0")
        if not 0 <= self.scale_range < 1:
            raise ValueError(f"--refine-scales {self.scale_range} must be in [0, 1)")


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(torch.float32) - x).detach()


class KQuantCodes:
    """GPTQ's K-quant result as a function of per-weight offsets V and per-block scale factors A: values exactly as
    quant/grid.py computes them."""

    def __init__(self, grid, params: list, codes: torch.Tensor, targets: torch.Tensor, shape: torch.Size,
                 device: torch.device):
        from moeq2gguf.quant.grid import _KQuantColumns
        fmt = grid.fmt
        self.params = params
        cols = [_KQuantColumns(fmt, p, device) for p in params]
        sub = cols[0].sub
        self.dm = (torch.cat([c.dm.repeat_interleave(sub, dim=1) for c in cols], dim=1)
                   if isinstance(fmt, ScaleMinFormat) else None)
        # the super-block scales [N, nb] and each weight's sub-block scale (an integer, as float32)
        self.d = torch.stack([torch.from_numpy(p.d[:, 0].astype(np.float32)) for p in params], dim=1).to(device)
        self.sc = torch.cat([torch.from_numpy(p.sc[:, 0].astype(np.float32)).repeat_interleave(sub, dim=1)
                             for p in params], dim=1).to(device)
        self.per_block = self.sc.shape[1] // len(params)
        self.dsub = self.weight_scales(self.d)      # [N, K], GPTQ's
        self.codes0 = codes.reshape(self.dsub.shape).to(device=device, dtype=torch.float32)
        self.frozen = self.dsub == 0          # ggml's fallback codes there: values do not depend on them
        self.x = targets.reshape(self.dsub.shape).to(device=device, dtype=torch.float32)
        # the walk's own rounding (quant/grid.py), in the same float32 operations: code = nearest((x + dmin*mn) / (d*sc))
        # in 0..nmax, or half + nearest(x / (d*sc)) in -half..half-1 (adding half before rounding would round twice)
        if isinstance(fmt, ScaleMinFormat):
            self.lo, self.hi, self.offset, self.half = 0.0, float(fmt.nmax), 0.0, None
        else:
            self.lo, self.hi, self.offset, self.half = float(-fmt.half), float(fmt.half - 1), float(fmt.half), float(fmt.half)
        self.u = self._u(self.dsub)
        self.shape = shape

    def _u(self, dsub: torch.Tensor) -> torch.Tensor:
        safe = torch.where(self.frozen, torch.ones_like(dsub), dsub)
        return (self.x + self.dm) / safe if self.dm is not None else self.x / safe

    def weight_scales(self, d: torch.Tensor) -> torch.Tensor:
        """Each weight's scale d * sc [N, K] for super-block scales d [N, nb]: the float32 product grid.py forms."""
        return d.repeat_interleave(self.per_block, dim=1) * self.sc

    def scales(self, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(super-block scales [N, nb] as stored: fp16 values, each weight's d * sc [N, K]) for factors 1 + a."""
        if a is None:
            return self.d, self.dsub
        d = _fp16_ste(self.d * (1 + a))
        return d, self.weight_scales(d)

    def codes(self, v: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        u = self.u if a is None else self._u(self.scales(a)[1])
        moved = self.offset + _round_ste(u + v.reshape(u.shape)).clamp(self.lo, self.hi)
        return torch.where(self.frozen, self.codes0, moved)

    def values(self, v: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        return self.values_of(self.codes(v, a), self.scales(a)[1])

    def values_of(self, codes: torch.Tensor, dsub: torch.Tensor | None = None) -> torch.Tensor:
        """The weights the runtime decodes from these codes (the scales' float32 products, as grid.py)."""
        dsub = self.dsub if dsub is None else dsub
        c = codes.reshape(self.codes0.shape).to(torch.float32)
        out = dsub * c - self.dm if self.dm is not None else dsub * (c - self.half)
        return out.reshape(self.shape)

    def tuned_params(self, d: torch.Tensor) -> list:
        """GPTQ's per-block params with the super-block scales d [N, nb] (fp16 values) in place of its own."""
        d = d.detach().to("cpu", torch.float32).numpy()
        return [dataclasses.replace(p, d=np.ascontiguousarray(d[:, i:i + 1]).astype(p.d.dtype))
                for i, p in enumerate(self.params)]


def refinable(grid) -> bool:
    return hasattr(grid, "fmt") and isinstance(grid.fmt, (ScaleMinFormat, SignedScaleFormat))


def _router_probs(x: torch.Tensor, w_next: dict, spec, bid_next: int) -> torch.Tensor:
    _, flat = nn.attention_half(x, w_next, spec, None, bid_next)
    probs, _ = nn.selection_scores(nn.router_logits(flat, w_next), spec, w_next.get("exp_probs_b.bias"))
    return probs


def _log_dist(x: torch.Tensor, next_layer, spec) -> torch.Tensor | None:
    """Log-probabilities the routing term compares: the next layer's router, or the output logits after the last."""
    kind, w_next, bid_next = next_layer
    if kind == "router":
        p = _router_probs(x, w_next, spec, bid_next)
        if spec.routing.scoring == "softmax_topk":   # gpt-oss: the scores are logits
            return torch.log_softmax(p, dim=-1)
        if spec.routing.scoring == "sigmoid":   # independent gates: compare the normalised scores
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.log(p.clamp_min(1e-30))
    if kind == "head":
        return torch.log_softmax(nn.head(x, w_next["output_norm.weight"], w_next["output"], spec), dim=-1).reshape(
            -1, w_next["output"].shape[0])
    return None


def refine_layer(xs: list[torch.Tensor], targets: list[torch.Tensor], weights: dict[str, torch.Tensor],
                 tunable: dict[str, KQuantCodes], spec, bid: int, next_layer, cfg: RefineConfig) -> tuple[dict, dict]:
    """Tune the codes of `tunable` (block keys) in the layer whose quantized weights are `weights`, on inputs xs and the
    float layer's outputs `targets` (lists of batches). next_layer: ("router", float weights, index), ("head", {output_norm
    .weight, output}, None) or (None, None, None). Returns ({key: (codes [N, K] int32, super-block scales [N, nb])},
    report)."""
    steps = cfg.steps
    lr0 = cfg.lr if cfg.lr is not None else 1.0 / steps
    device = xs[0].device
    v = {k: torch.zeros(t.codes0.shape, device=device, requires_grad=True) for k, t in tunable.items()}
    factors = ({k: torch.zeros(t.d.shape, device=device, requires_grad=True) for k, t in tunable.items()}
               if cfg.scale_range > 0 else {k: None for k in tunable})
    fixed = {k: t.detach() for k, t in weights.items() if k not in tunable}
    with torch.no_grad():
        scale = [((t - x) ** 2).sum().clamp_min(1e-30) for x, t in zip(xs, targets)]
        target_logp = [_log_dist(t, next_layer, spec) for t in targets]   # reported even when not in the loss
    k_used = spec.n_experts_used

    def parts(b: int, grad: bool, with_kl: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(relative output error, routing KL, share of tokens whose next top-k set is the float one's) of batch b."""
        with torch.set_grad_enabled(grad):
            w = {**fixed, **{k: t.values(v[k], factors[k]) for k, t in tunable.items()}}
            y, _ = nn.decoder_layer(xs[b], w, spec, bid=bid)
            err = ((y - targets[b]) ** 2).sum() / scale[b]
            kl, agree = torch.zeros((), device=device), float("nan")
            if with_kl and target_logp[b] is not None:
                logp = _log_dist(y, next_layer, spec)
                kl = (target_logp[b].exp() * (target_logp[b] - logp)).sum(-1).mean()
                if next_layer[0] == "router":
                    same = (logp.topk(k_used, -1).indices.sort(-1).values ==
                            target_logp[b].topk(k_used, -1).indices.sort(-1).values).all(-1)
                    agree = float(same.float().mean())
        return err, kl, agree

    def evaluate() -> tuple[float, float, float]:
        runs = [parts(b, False, True) for b in range(len(xs))]
        return tuple(sum(float(r[i]) for r in runs) / len(xs) for i in range(3))

    err0, kl0, agree0 = evaluate()
    best, best_parts = err0 + cfg.routing_weight * kl0, (err0, kl0, agree0)
    def snapshot() -> dict:
        return {k: (v[k].detach().clone(), None if factors[k] is None else factors[k].detach().clone()) for k in tunable}

    best_state = snapshot()
    n_batches = len(xs)
    check_every = max(n_batches, steps // 4)   # full evaluations: a few per run, each a pass over the batches
    for step in range(steps):
        err, kl, _ = parts(step % n_batches, True, cfg.routing_weight > 0)
        (err + cfg.routing_weight * kl).backward()
        lr = lr0 * (1 - step / steps)
        with torch.no_grad():
            for t in v.values():
                t -= lr * torch.sign(t.grad)
                t.clamp_(-0.5, 0.5)
                t.grad = None
            for t in factors.values():
                if t is not None:
                    if t.grad is not None:
                        t -= lr * cfg.scale_lr_ratio * torch.sign(t.grad)
                    t.clamp_(-cfg.scale_range, cfg.scale_range)
                    t.grad = None
        if (step + 1) % check_every == 0 or step == steps - 1:   # is this the best V so far?
            e, k, a = evaluate()
            if e + cfg.routing_weight * k < best:
                best, best_parts = e + cfg.routing_weight * k, (e, k, a)
                best_state = snapshot()
    with torch.no_grad():
        result = {k: (t.codes(*best_state[k]).to(torch.int32), t.scales(best_state[k][1])[0]) for k, t in tunable.items()}
    moved = sum(int((result[k][0].float() != t.codes0).sum()) for k, t in tunable.items())
    rescaled = sum(int((result[k][1] != t.d).sum()) for k, t in tunable.items())
    assert all(torch.equal(t.codes(torch.zeros_like(t.u), torch.zeros_like(t.d)), t.codes0) for t in tunable.values()), \
        "V = 0, A = 0 must give GPTQ's codes"
    total = sum(t.codes0.numel() for t in tunable.values())
    return result, {"error_before": err0, "error_after": best_parts[0], "routing_kl_before": kl0,
                    "routing_kl_after": best_parts[1], "routing_agreement_before": agree0,
                    "routing_agreement_after": best_parts[2], "codes_moved": moved, "codes": total,
                    "scales_moved": rescaled, "scales": sum(t.d.numel() for t in tunable.values())}
