"""An i-quant lattice seen as GPTQ's grid, one group of 8 weights at a time (the vector form of GPTQ).

The i-quants choose 8 weights jointly: a codebook entry (one 8-vector, or two 4-vectors for the IQ3s), their signs
(7 free and one implied by parity for IQ2_XXS, IQ2_XS and IQ3_XXS; all 8 for IQ2_S and IQ3_S; none for the IQ1s, which
instead shift by +-1/8) under a scale shared by 16 or 32 weights. So the walk here differs from the K-quants' in one
place: when it reaches a group, the whole group is chosen at once, against the current (error-updated) weights, by
exhaustive search over the codebook with the best signs for each entry, under the group's diagonal GPTQ weights; then
its error is spread column by column as usual (quant/gptq.py). A block's scales are ggml's own search on the block when
the walk reaches it, then frozen, as for the K-quants; the chosen codes are written into those bytes
(formats/iq_layout.py), so the file holds the scales ggml chose and the codes GPTQ chose.

Search per group (x the 8 current weights, w their weights, dl the group's scale, V the codebook's magnitudes):
cost(entry) = sum w (|x| - |dl| V)^2 with each sign that of x (optimal for nonnegative magnitudes); with parity and an
odd number of negatives one weight must take the wrong sign, which costs 4 w |x| |dl| V at that weight: the cheapest
one is flipped, and the entry is chosen with that cost included (for the IQ3s' two halves, the flip goes to whichever
half it costs least). Everything runs as tensor operations on the weights' device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeq2gguf.formats import iq_layout
from moeq2gguf.formats.lattice import quantize_lattice
from moeq2gguf.profile import stage

ROW_CHUNK = 4096   # rows searched at once: bounds the [rows, codebook, dim] flip-cost tensor


@dataclass
class LatticeBlock:
    """One fitted 256-column block of every row: ggml's bytes, each group's scale and shift, and the codes GPTQ picks."""
    blocks: np.ndarray         # [N, block_bytes] uint8
    dl: torch.Tensor           # [N, 32] float32 on the walk's device
    delta: torch.Tensor        # [N, 32] float32 (IQ1_S: the block's shift; 0 for the signed lattices)
    idx: torch.Tensor          # [N, 32, parts] int64
    signs: torch.Tensor        # [N, 32] uint8 (bit i: weight i negative)
    neg_delta: torch.Tensor    # [N, 32] bool (IQ1_M's per-group shift)


class LatticeGrid:
    group = 256     # columns that share fitted scales (the super-block)
    vector = 8      # columns chosen jointly

    def __init__(self, qtype):
        self.qtype = qtype
        self.layout = iq_layout.layout(qtype)
        self.rows_per_expert: int | None = None
        self._tables: dict = {}

    def prepare(self, rows: torch.Tensor) -> None:
        """rows [G, R, K]: ggml's search takes one importance vector per expert, so fit splits the rows by expert."""
        self.rows_per_expert = rows.shape[-2]

    def _values(self, device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = torch.from_numpy(self.layout.values).to(device)
        return self._tables[device]

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> LatticeBlock:
        with stage("scale search"):
            rows = np.ascontiguousarray(w.detach().cpu().numpy(), dtype=np.float32)
            imp = importance.detach().cpu().numpy().astype(np.float32)
            step = self.rows_per_expert or rows.shape[0]
            parts = []
            for r0 in range(0, rows.shape[0], step):
                vec = imp[r0]
                if not np.any(vec > 0):      # an expert no token reached (gptq without blending): plain weights
                    vec = np.ones_like(vec)
                parts.append(quantize_lattice(self.qtype, rows[r0:r0 + step], np.ascontiguousarray(vec)))
            blocks = np.concatenate(parts, axis=0)
            dl, delta = iq_layout.group_scales(self.qtype, blocks)
            idx, signs, neg_delta = iq_layout.read_groups(self.qtype, blocks)
            dev = w.device
            return LatticeBlock(blocks, torch.from_numpy(dl).to(dev), torch.from_numpy(delta).to(dev),
                                torch.from_numpy(idx.astype(np.int64)).to(dev), torch.from_numpy(signs).to(dev),
                                torch.from_numpy(neg_delta).to(dev))

    def round_group(self, x: torch.Tensor, weights: torch.Tensor, block: LatticeBlock, jj: int) -> torch.Tensor:
        """Choose group jj // 8 of every row: x [N, 8] current weights, weights [N, 8] > 0. Returns the values [N, 8]
        the runtime will decode (bit-identical to gguf-py's dequantization) and records the codes in block."""
        with stage("round"):
            g = jj // self.vector
            out = torch.empty_like(x, dtype=torch.float32)
            for r0 in range(0, x.shape[0], ROW_CHUNK):
                r1 = min(r0 + ROW_CHUNK, x.shape[0])
                out[r0:r1] = self._choose(x[r0:r1].to(torch.float32), weights[r0:r1].to(torch.float32), block, g, r0, r1)
            return out

    def _choose(self, x, w, block: LatticeBlock, g: int, r0: int, r1: int) -> torch.Tensor:
        V = self._values(x.device)
        dl = block.dl[r0:r1, g]
        if not self.layout.signed:
            return self._choose_shifted(x, w, block, g, r0, r1, V, dl)
        dim, parts = self.layout.dim, self.layout.parts
        n = x.shape[0]
        want_neg = (x < 0) ^ (dl < 0)[:, None]                        # the sign each weight would like
        a, mag = x.abs(), dl.abs()[:, None]
        costs, flips = [], []
        for p in range(parts):
            ap, wp = a[:, p * dim:(p + 1) * dim], w[:, p * dim:(p + 1) * dim]
            wa = wp * ap
            costs.append(mag * mag * (wp @ (V * V).T) - 2 * mag * (wa @ V.T))     # [n, C] up to a constant
            if self.layout.parity:
                flips.append(4 * mag * (wa[:, None, :] * V[None]).amin(-1))      # [n, C]: cheapest wrong sign
        odd = (want_neg.sum(-1) % 2 == 1) if self.layout.parity else torch.zeros(n, dtype=torch.bool, device=x.device)
        chosen, flip_part = [], torch.full((n,), -1, dtype=torch.int64, device=x.device)
        if parts == 1:
            total = costs[0] + flips[0] * odd[:, None] if self.layout.parity else costs[0]
            chosen.append(total.argmin(-1))
            flip_part = torch.where(odd, 0, flip_part)
        else:
            best = [c.argmin(-1) for c in costs]
            if self.layout.parity:
                with_flip = [(c + f).argmin(-1) for c, f in zip(costs, flips)]
                gather = lambda t, i: t.gather(1, i[:, None])[:, 0]          # noqa: E731
                flip_first = gather(costs[0] + flips[0], with_flip[0]) + gather(costs[1], best[1])
                flip_second = gather(costs[0], best[0]) + gather(costs[1] + flips[1], with_flip[1])
                first = odd & (flip_first <= flip_second)
                second = odd & ~first
                best = [torch.where(first, with_flip[0], best[0]), torch.where(second, with_flip[1], best[1])]
                flip_part = torch.where(first, 0, torch.where(second, 1, flip_part))
            chosen = best
        idx = torch.stack(chosen, dim=1)                                 # [n, parts]
        mags = V[idx].reshape(n, 8)
        neg = want_neg.clone()
        if self.layout.parity:
            rows = torch.nonzero(flip_part >= 0)[:, 0]
            if rows.numel():
                p = flip_part[rows]
                cols = p[:, None] * dim + torch.arange(dim, device=x.device)
                cost = (w[rows[:, None], cols] * a[rows[:, None], cols] * mags[rows[:, None], cols])
                at = cols.gather(1, cost.argmin(-1, keepdim=True))[:, 0]
                neg[rows, at] = ~neg[rows, at]
        sign = torch.where(neg, torch.tensor(-1.0, device=x.device), torch.tensor(1.0, device=x.device))
        bits = (neg.to(torch.int32) << torch.arange(8, device=x.device, dtype=torch.int32)).sum(-1).to(torch.uint8)
        block.idx[r0:r1, g] = idx
        block.signs[r0:r1, g] = bits
        return dl[:, None] * mags * sign                              # gguf-py's (db * grid) * signs

    def _choose_shifted(self, x, w, block: LatticeBlock, g, r0, r1, V, dl) -> torch.Tensor:
        """The IQ1s: values dl (V + delta), delta = +-1/8 (IQ1_M picks it per group; IQ1_S's is the block's)."""
        n = x.shape[0]
        wx = w * x
        options = (False, True) if self.layout.delta_per_group else None
        if options is None:
            delta = block.delta[r0:r1, g]
            costs = []
            for sign in (1.0, -1.0):
                Vd = V + sign * 0.125
                costs.append(dl[:, None] ** 2 * (w @ (Vd * Vd).T) - 2 * dl[:, None] * (wx @ Vd.T))
            cost = torch.where((delta < 0)[:, None], costs[1], costs[0])
            idx, neg_delta = cost.argmin(-1), delta < 0
        else:
            best_cost, best_idx = [], []
            for sign in (1.0, -1.0):
                Vd = V + sign * 0.125
                c = dl[:, None] ** 2 * (w @ (Vd * Vd).T) - 2 * dl[:, None] * (wx @ Vd.T)
                m, i = c.min(-1)
                best_cost.append(m)
                best_idx.append(i)
            neg_delta = best_cost[1] < best_cost[0]
            idx = torch.where(neg_delta, best_idx[1], best_idx[0])
            block.neg_delta[r0:r1, g] = neg_delta
        block.idx[r0:r1, g, 0] = idx
        delta = torch.where(neg_delta, torch.tensor(-0.125, device=x.device), torch.tensor(0.125, device=x.device))
        return dl[:, None] * (V[idx] + delta[:, None])                # gguf-py's dl * (grid + delta)

    def pack(self, blocks: list[LatticeBlock], codes=None) -> np.ndarray:
        """Bytes [N, nb * block_bytes]: ggml's scales with the codes the walk chose (the walk's codes array is unused)."""
        out = []
        for b in blocks:
            data = b.blocks.copy()
            iq_layout.write_groups(self.qtype, data, b.idx.cpu().numpy(), b.signs.cpu().numpy(), b.neg_delta.cpu().numpy())
            out.append(data)
        return np.concatenate(out, axis=1)
