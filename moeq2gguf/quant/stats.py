"""Calibration statistics of one decoder layer: second moments of each linear's input.

Routed experts get one Hessian per expert. With affinity weighting (MoEQuant's AGQ, docs/METHODS.md
section 3) every token's contribution is multiplied by the routing weight the runtime applies to that
expert's output (and a gated shared expert's by its sigmoid gate); without it every routed token counts
once, as GPTQ and llama-imatrix do. Coverage (section 4): an expert seen by fewer tokens than its input
width is blended with the layer's pooled Hessian; one never seen uses the pooled Hessian alone.
A per-head weight stack (MLA's attn_k_b / attn_v_b) is observed as x [T, H, K]: one group per head,
each with its own statistics, every token counted once per head; heads are never blended.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    """Sums over the tokens that reached one input, per group (expert, or a single group)."""
    weighted_xxt: torch.Tensor | None   # [G, K, K] sum of w_t x x^T (None when only diagonals are kept)
    weighted_sq: torch.Tensor           # [G, K]    sum of w_t x^2
    plain_sq: torch.Tensor              # [G, K]    sum of x^2 (llama-imatrix's statistic)
    count: torch.Tensor                 # [G]       tokens
    mass: torch.Tensor                  # [G]       sum of w_t
    routed: bool = False                # groups are routed experts (coverage applies), not heads
    # routed inputs: the same sums over every expert's tokens (the pooled Hessian rare experts fall back on),
    # accumulated as the observations arrive, so that a rank holding only some experts (parallel.py) has them too
    pooled_xxt: torch.Tensor | None = None   # [K, K]
    pooled_sq: torch.Tensor | None = None    # [K]
    pooled_count: torch.Tensor | None = None # []
    pooled_mass: torch.Tensor | None = None  # []

    @classmethod
    def empty(cls, groups: int, k: int, full: bool, device: torch.device, routed: bool = False) -> "InputStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64 if len(s) < 3 else torch.float32, device=device)  # noqa: E731
        pooled = (z(k, k) if full else None, z(k), z(()), z(())) if routed else (None,) * 4
        return cls(z(groups, k, k) if full else None, z(groups, k), z(groups, k), z(groups), z(groups), routed, *pooled)


@dataclass
class Coverage:
    tokens: list[int]
    mass: list[float]
    fallback: list[str]          # own | blended | pooled


class StatsCollector:
    """An nn.Observer accumulating InputStats for every input of one layer. experts: the routed experts whose own
    statistics are kept (a rank's share under torch.distributed, parallel.py; default all); every expert's tokens
    still reach the pooled sums."""

    def __init__(self, n_experts: int, affinity: bool, full: bool, device: torch.device | str = "cpu",
                 experts: range | None = None):
        self.n_experts, self.affinity, self.full = n_experts, affinity, full
        self.device = torch.device(device)
        self.experts = range(n_experts) if experts is None else experts
        self.inputs: dict[str, InputStats] = {}
        # (key, value) a method derived from these sums last (methods/gptq.py: Hessians and their inverse factor);
        # any change to the sums drops it
        self.factor_cache: tuple | None = None

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        self.factor_cache = None
        routed = expert is not None
        if x.dim() == 3:
            assert not routed and token_weight is None, "per-head inputs are unrouted and unweighted"
            self._observe_heads(name, x)
            return
        stats = self.inputs.get(name)
        if stats is None:
            stats = self.inputs[name] = InputStats.empty(len(self.experts) if routed else 1, x.shape[-1], self.full,
                                                         self.device, routed)
        x = x.to(self.device, torch.float32)
        w = token_weight.to(self.device, torch.float32) if (self.affinity and token_weight is not None) else None
        sq = x * x
        plain_sq = sq.sum(0, dtype=torch.float64)
        if w is None:
            weighted_sq, mass = plain_sq, torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.device)
            xxt = x.T @ x if self.full else None
        else:
            weighted_sq, mass = (sq * w[:, None]).sum(0, dtype=torch.float64), w.sum(dtype=torch.float64)
            xxt = (x * w[:, None]).T @ x if self.full else None
        if routed:
            stats.pooled_sq += weighted_sq
            stats.pooled_count += x.shape[0]
            stats.pooled_mass += mass
            if self.full:
                stats.pooled_xxt += xxt
            if expert not in self.experts:
                return
        g = expert - self.experts.start if routed else 0
        stats.plain_sq[g] += plain_sq
        stats.count[g] += x.shape[0]
        stats.weighted_sq[g] += weighted_sq
        stats.mass[g] += mass
        if self.full:
            stats.weighted_xxt[g] += xxt

    def adopt_pooled(self, other: "StatsCollector") -> None:
        """Take the pooled sums of every routed input from `other`, a collector that saw all of the layer's tokens
        (this one saw only its experts' tokens: a group of passes/expert_groups.py). An input none of this collector's
        experts saw gets zero sums of its own, so its experts fall back on the pooled Hessian as in one pass."""
        self.factor_cache = None
        for name, theirs in other.inputs.items():
            if not theirs.routed:
                continue
            mine = self.inputs.get(name)
            if mine is None:
                k = theirs.plain_sq.shape[-1]
                mine = self.inputs[name] = InputStats.empty(len(self.experts), k, self.full, self.device, routed=True)
            mine.pooled_xxt, mine.pooled_sq = theirs.pooled_xxt, theirs.pooled_sq
            mine.pooled_count, mine.pooled_mass = theirs.pooled_count, theirs.pooled_mass

    def _observe_heads(self, name: str, x: torch.Tensor) -> None:
        """x [T, H, K]: head h's input rows are x[:, h]."""
        t, heads, k = x.shape
        stats = self.inputs.get(name)
        if stats is None:
            stats = self.inputs[name] = InputStats.empty(heads, k, self.full, self.device)
        x = x.to(self.device, torch.float32)
        sq = (x * x).sum(0, dtype=torch.float64)                       # [H, K]
        stats.plain_sq += sq
        stats.weighted_sq += sq
        stats.count += t
        stats.mass += t
        if self.full:
            stats.weighted_xxt += torch.einsum("thk,thl->hkl", x, x)

    def scale_input(self, name: str, r: torch.Tensor) -> None:
        """The input was x and is x * r now, r [G or 1, K] (a transform of the layer: smoothing, one r for every
        group, or per-expert smoothing, one per expert): every sum follows (x x^T -> r x x^T r per group;
        x^2 -> r^2 x^2), the pooled sums of a routed input too; counts and masses are unchanged."""
        self.factor_cache = None
        s = self.inputs[name]
        per_group = r.shape[0] > 1
        if per_group and s.routed and len(self.experts) != self.n_experts:
            raise AssertionError("per-expert input scales need every expert's sums to rebuild the pooled ones")
        r = r.to(self.device, torch.float64).expand(s.plain_sq.shape)
        s.plain_sq *= r * r
        s.weighted_sq *= r * r
        if s.weighted_xxt is not None:
            r32 = r.to(s.weighted_xxt.dtype)
            s.weighted_xxt *= r32[:, :, None] * r32[:, None, :]
        if not s.routed:
            return
        if per_group:   # each expert's tokens scale by their own r: the pooled sums are the experts' sums again
            s.pooled_sq = s.weighted_sq.sum(0)
            if s.weighted_xxt is not None:
                s.pooled_xxt = s.weighted_xxt.sum(0, dtype=s.pooled_xxt.dtype)
        else:
            s.pooled_sq = s.pooled_sq * r[0] * r[0]
            if s.pooled_xxt is not None:
                r32 = r[0].to(s.pooled_xxt.dtype)
                s.pooled_xxt = s.pooled_xxt * r32[:, None] * r32[None, :]

    def hessians(self, name: str, blend_rare: bool | str) -> tuple[torch.Tensor, Coverage]:
        """Normalised Hessians [G, K, K] for one input, with the coverage fallback applied.

        blend_rare: True blends experts with fewer tokens than K with the pooled Hessian (moequant); "neutral" instead
        blends every expert with a neutral prior worth one token (llama.cpp's imatrix --prior-weight 1: the identity
        times the pooled mean channel energy; a benchmark comparison, tools/bench_quality.py +neutralprior);
        otherwise only experts with no token at all take the pooled one (their own would be zero)."""
        s = self.inputs[name]
        assert s.weighted_xxt is not None, "collector kept diagonals only"
        return _normalise(s.weighted_xxt, s.pooled_xxt, s, blend_rare if s.routed else False)

    def diagonals(self, name: str, blend_rare: bool) -> tuple[torch.Tensor, Coverage]:
        s = self.inputs[name]
        pooled = None if s.pooled_sq is None else s.pooled_sq.to(torch.float32)
        return _normalise(s.weighted_sq.to(torch.float32), pooled, s, blend_rare if s.routed else False)


def _normalise(sums: torch.Tensor, pooled_sums: torch.Tensor | None, s: InputStats,
               blend_rare: bool | str) -> tuple[torch.Tensor, Coverage]:
    mass = s.mass.to(torch.float32)
    k = sums.shape[-1]
    if pooled_sums is None:   # unrouted groups (one matrix, or heads): pooled over the groups at hand
        total_mass, total_count = mass.sum(), s.count.sum()
        pooled_sums = sums.sum(0)
    else:
        total_mass, total_count = s.pooled_mass.to(torch.float32), s.pooled_count
    pooled = pooled_sums / total_mass.clamp_min(1e-30)
    # a pseudo-mass of K tokens' worth of the layer's average weight
    lam = k * float(total_mass / total_count.clamp_min(1))
    out = torch.empty_like(sums)
    fallback = []
    if blend_rare == "neutral":   # llama.cpp's neutral prior of one token's weight, for every expert
        energy = (pooled.diagonal() if pooled.dim() == 2 else pooled).mean()
        neutral = energy * (torch.eye(k, dtype=sums.dtype, device=sums.device) if sums.dim() == 3 else
                            torch.ones(k, dtype=sums.dtype, device=sums.device))
        one = float(total_mass / total_count.clamp_min(1))
        for g in range(sums.shape[0]):
            out[g] = (sums[g] + one * neutral) / (mass[g] + one)
            fallback.append("own" if s.count[g] >= k else "neutral prior" if s.count[g] == 0 else "blended")
        return out, Coverage([int(c) for c in s.count], [float(m) for m in s.mass], fallback)
    for g in range(sums.shape[0]):
        if s.count[g] == 0:
            out[g] = pooled
            fallback.append("pooled")
        elif blend_rare and s.count[g] < k:
            out[g] = (sums[g] + lam * pooled) / (mass[g] + lam)
            fallback.append("blended")
        else:
            out[g] = sums[g] / mass[g]
            fallback.append("own")
    return out, Coverage([int(c) for c in s.count], [float(m) for m in s.mass], fallback)
