"""One process against torchrun at world sizes 1, 2 and 3 (moeq2gguf/parallel.py): the files' sha256, wall time and each
rank's peak expert statistics, per method, on a bundled model.

usage: python tools/bench_parallel.py [--model qwen2moe-tiny] [--methods gptq moequant] [--sizes 1 2 3]
                                      [--threads 1] [--write]

Every process runs --threads T (default 1: the same thread count everywhere, which byte identity needs; torch's CPU
kernels round differently with another count). Calibration: convert's defaults (32 windows of 512 tokens).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- bench_parallel:begin -->", "<!-- bench_parallel:end -->"


def run(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2moe-tiny")
    ap.add_argument("--methods", nargs="+", default=["gptq", "moequant"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    model = REPO / "moeq2gguf" / "fixtures" / args.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            common = ["convert", str(model), "--type", args.type, "--method", method, "--threads", str(args.threads), "-q"]
            runs = [("one process", [sys.executable, "-m", "moeq2gguf", "-v"])]
            runs += [(f"torchrun {n}", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                        str(n), "-m", "moeq2gguf", "-v"]) for n in args.sizes]
            for label, prefix in runs:
                out = Path(tmp) / f"{method}-{label.replace(' ', '-')}.gguf"
                seconds, err = run([*prefix, *common, "-o", str(out)])
                peaks = [float(m) for m in re.findall(r"peak expert statistics ([0-9.]+) MiB", err)]
                sha = hashlib.sha256(out.read_bytes()).hexdigest()
                rows.append((method, label, sha, seconds, peaks))
                print(f"{method:9} {label:12} sha256 {sha}  {seconds:6.1f} s  peak expert statistics per rank {peaks} MiB",
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    lines = ["| method | run | sha256 (first 16) | same as one process | wall (s) | vs one process | peak expert statistics "
             "per rank (MiB) | largest / one process |", "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        ref = next(r for r in rows if r[0] == method and r[1] == "one process")
        for m, label, sha, seconds, peaks in (r for r in rows if r[0] == method):
            lines.append(f"| {m} | {label} | {sha[:16]} | {'yes' if sha == ref[2] else 'NO'} | {seconds:.1f} | "
                         f"{seconds / ref[3]:.2f} | {', '.join(f'{p:.2f}' for p in sorted(peaks))} | "
                         f"{max(peaks) / max(ref[4]):.3f} |")
    text = (f"{MARK_BEGIN}\n## Expert-parallel conversion under torchrun (issue 25)\n\n"
            f"Command: `python tools/bench_parallel.py {' '.join(sys.argv[1:]).replace('--write', '').strip()}`  \n"
            f"Date: {datetime.date.today()}. Machine: {os.uname().sysname} {os.uname().machine}, {os.cpu_count()} cores, "
            f"no GPU, gloo on CPU. Commit: {commit}. Model: {args.model}, --type {args.type}, calibration 32 x 512 "
            f"tokens, --threads {args.threads} in every process. Wall: the whole command (torchrun's start included).\n\n"
            + "\n".join(lines) + f"\n{MARK_END}\n")
    print(text)
    if args.write:
        sys.path.insert(0, str(REPO / "tools"))
        from bench_quality import write_section
        write_section(text, MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
