#!/usr/bin/env python
"""Throughput of moeq2gguf's block-format quantizers against ggml's own C quantizer.

For each format, quantizes the same float32 matrix (default 64M weights, 4096 columns) with
`BlockFormat.quantize` and with `ggml_quantize_chunk` (libggml-base from llama-cpp-python), in the
same process: single-threaded (numba.set_num_threads(1); one C call) and on all cores (numba's
threads; ggml over row chunks in a thread pool). Prints MB/s of float32 input and our/ggml ratios,
and checks that both produced the same bytes. Kernel compilation is excluded (a warm-up call).

    .venv/bin/python tools/bench_formats.py                    # 64M weights, no importance
    .venv/bin/python tools/bench_formats.py --weights 16M --importance both --formats Q4_K,Q8_0
    .venv/bin/python tools/bench_formats.py --weights 4M --importance both --formats IQ2_XXS,IQ1_M   # the i-quants

The i-quants (formats/lattice.py) go through their own entry point; IQ1_S, IQ2_XXS and IQ2_XS have no row without
an importance vector (ggml cannot quantize them so).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType

from moeq2gguf.formats import FORMATS, get_format, ggml_ref
from moeq2gguf.formats.lattice import KERNEL_NEEDS_IMPORTANCE, is_lattice, quantize_lattice

log = logging.getLogger("bench_formats")
N_COLS = 4096


def parse_count(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    value = int(float(text[:-1] if scale > 1 else text) * scale)
    if value < N_COLS:
        raise argparse.ArgumentTypeError(f"--weights {text} is below one {N_COLS}-column row; use at least 4K")
    return value


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(x: np.ndarray, importance: np.ndarray | None, qtype: GGMLQuantizationType, threads: int,
          repeat: int) -> dict[str, float | bool]:
    quantize = ((lambda rows, imp: quantize_lattice(qtype, rows, imp)) if is_lattice(qtype)
                else get_format(qtype).quantize)
    quantize(x[:2], importance)  # compile or load the kernels (and the lattices' search tables) outside the timing
    ggml_ref.quantize(x[:2], qtype, importance)   # ggml builds its i-quant tables on first use: outside the timing too
    mb = x.nbytes / 1e6
    row: dict[str, float | bool] = {}
    outputs = {}
    for n_threads in sorted({1, threads}):
        numba.set_num_threads(n_threads)
        outputs["ours"] = None
        row[f"ours_{n_threads}"] = mb / best_time(lambda: outputs.__setitem__("ours", quantize(x, importance)),
                                                  repeat)
        row[f"ggml_{n_threads}"] = mb / best_time(
            lambda: outputs.__setitem__("ggml", ggml_ref.quantize(x, qtype, importance, n_threads=n_threads)), repeat)
        row["identical"] = bool(row.get("identical", True) and np.array_equal(outputs["ours"], outputs["ggml"]))
        outputs.clear()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=parse_count, default=parse_count("64M"),
                        help="matrix size in weights, e.g. 64M (default), 16M, 1M")
    parser.add_argument("--formats", default=",".join(q.name for q in FORMATS),
                        help="comma-separated GGML type names (default: all registered)")
    parser.add_argument("--importance", choices=["none", "imatrix", "both"], default="none",
                        help="quantize without an importance vector (default), with one, or both")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the all-core run")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (the best is kept)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    qtypes = [GGMLQuantizationType[name.strip().upper()] for name in args.formats.split(",") if name.strip()]
    n_rows = args.weights // N_COLS
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_rows, N_COLS), dtype=np.float32) * np.float32(0.02)
    imatrix = np.exp(rng.normal(0.0, 1.0, N_COLS)).astype(np.float32)
    modes = {"none": [None], "imatrix": [imatrix], "both": [None, imatrix]}[args.importance]
    threads = max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS))
    log.info("matrix %d x %d float32 (%.1fM weights, %.0f MB), %d threads for the all-core run",
             n_rows, N_COLS, x.size / (1 << 20), x.nbytes / 1e6, threads)

    header = (f"{'format':8} {'imatrix':7} | {'ours 1T':>9} {'ggml 1T':>9} {'ratio':>6} | "
              f"{'ours ' + str(threads) + 'T':>9} {'ggml ' + str(threads) + 'T':>9} {'ratio':>6} | bytes")
    lines = [header, "-" * len(header)]
    for qtype in qtypes:
        for importance in modes:
            if importance is None and qtype in KERNEL_NEEDS_IMPORTANCE:
                continue
            log.info("%s %s ...", qtype.name, "imatrix" if importance is not None else "no imatrix")
            r = bench(x, importance, qtype, threads, args.repeat)
            lines.append(f"{qtype.name:8} {'yes' if importance is not None else 'no':7} | "
                         f"{r['ours_1']:9.1f} {r['ggml_1']:9.1f} {r['ours_1'] / r['ggml_1']:6.2f} | "
                         f"{r[f'ours_{threads}']:9.1f} {r[f'ggml_{threads}']:9.1f} "
                         f"{r[f'ours_{threads}'] / r[f'ggml_{threads}']:6.2f} | "
                         f"{'same' if r['identical'] else 'DIFFER'}")
    print(f"MB/s of float32 input, {x.size / (1 << 20):.0f}M weights ({n_rows} x {N_COLS}); "
          "ratio = ours / ggml")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
