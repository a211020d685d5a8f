#!/usr/bin/env python
"""GPTQ's column rounding on the weights' device (quant/grid.py's K-quant path) against rounding each column on the
host with the format's numba kernel (the path every format had before): wall time of one GPTQ of a stack of
experts, medians of interleaved rounds, and whether both give identical weights and codes.

    .venv/bin/python tools/bench_grid_round.py [--device cpu|cuda] [--experts 8] [--rows 128] [--cols 512]
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import torch

from moeq2gguf.quant.grid import FormatGrid
from moeq2gguf.quant.gptq import gptq_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    G, R, K = args.experts, args.rows, args.cols
    W = (torch.randn(G, R, K) * 0.05).to(dev)
    X = torch.randn(G, 2048, K, device=dev)
    H = X.transpose(1, 2) @ X / 2048
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q2_K):
        times: dict[str, list[float]] = {"device": [], "host": []}
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for _ in range(args.rounds):
            for mode in times:
                grid = FormatGrid(qtype)
                grid.prepare(W.reshape(-1, K))
                if mode == "host":
                    grid.round = lambda c, p, j, g=grid: g._round(c, p, j)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                Q, codes, _ = gptq_quantize(W, H, grid)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                outputs[mode] = (Q.cpu(), codes)
        same = torch.equal(outputs["device"][0], outputs["host"][0]) and torch.equal(outputs["device"][1], outputs["host"][1])
        host, device = statistics.median(times["host"]), statistics.median(times["device"])
        print(f"{qtype.name}: GPTQ of {G} experts x {R} x {K} on {args.device}, median of {args.rounds}: "
              f"host rounding {host:.3f} s, device rounding {device:.3f} s, ratio {device / host:.3f}; identical: {same}")


if __name__ == "__main__":
    main()
