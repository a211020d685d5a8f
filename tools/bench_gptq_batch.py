#!/usr/bin/env python
"""GPTQ of a layer's experts batched (one walk over all of them, quant/gptq.py) against a loop over the experts one at a
time (issue 20): seconds, median of --repeat, and whether the two give the same weights. Random weights, Hessians from
random correlated inputs; the format's own scale search and rounding (quant/grid.FormatGrid), as the converter runs it.

    python tools/bench_gptq_batch.py --device cpu --experts 8                  # Qwen1.5-MoE-A2.7B's gate shape
    python tools/bench_gptq_batch.py --device cuda --experts 60 --rows 1408 --cols 2048
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeq2gguf.quant.gptq import gptq_quantize  # noqa: E402
from moeq2gguf.quant.grid import FormatGrid  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def walk(W: torch.Tensor, H: torch.Tensor, qtype) -> torch.Tensor:
    grid = FormatGrid(qtype)
    grid.prepare(W)
    return gptq_quantize(W, H, grid)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1408)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    qtype = gguf.GGMLQuantizationType[args.type]
    gen = torch.Generator().manual_seed(0)
    E, R, K = args.experts, args.rows, args.cols
    W = (torch.randn(E, R, K, generator=gen) * 0.02).to(device)
    mix = (torch.randn(K, K, generator=gen) / K ** 0.5 + torch.eye(K)).to(device)
    H = torch.stack([(x.T @ x) / x.shape[0] for x in
                     (torch.randn(2 * K, K, generator=gen).to(device) @ mix for _ in range(E))])
    walk(W[:1, :16], H[:1], qtype)   # warm-up: numba compilation, CUDA context
    batched, looped, same = [], [], True
    for _ in range(args.repeat):
        sync(device)
        t0 = time.perf_counter()
        Qb = walk(W, H, qtype)
        sync(device)
        t1 = time.perf_counter()
        Ql = torch.cat([walk(W[e:e + 1], H[e:e + 1], qtype) for e in range(E)])
        sync(device)
        t2 = time.perf_counter()
        batched.append(t1 - t0)
        looped.append(t2 - t1)
        same = same and torch.equal(Qb, Ql)
    b, lo = statistics.median(batched), statistics.median(looped)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.type}: GPTQ of {E} experts x {R} x {K} on {name}, median of {args.repeat}: batched {b:.2f} s, "
          f"per-expert loop {lo:.2f} s, loop / batched {lo / b:.2f}x; same weights: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
