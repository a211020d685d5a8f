#!/usr/bin/env python
"""Two conversions at once vs one alone: does the converter behave when it shares the machine?

Times `moeq2gguf convert FIXTURE --type Q4_K_M --method gptq` (a CLI process each, as a user runs it) alone, then
two started together (wall time until both finish), `--rounds` times each, interleaved; prints the medians and
their ratio. Target: two together <= 2.5x one alone. With `--wait-policy ACTIVE` the children run with
OMP_WAIT_POLICY=ACTIVE (OpenMP's spinning, what the package turned off by default: docs/PLATFORMS.md) for
the comparison.

    .venv/bin/python tools/bench_shared_cpu.py                         # the package's defaults
    .venv/bin/python tools/bench_shared_cpu.py --wait-policy ACTIVE    # the old behaviour
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def convert_cmd(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-c", "import sys; from moeq2gguf.cli import main; sys.exit(main())", "convert",
            str(model), "-o", str(out), "--type", args.type, "--method", args.method, "-q"]


def timed(cmds: list[list[str]], env: dict[str, str]) -> float:
    """Wall seconds from starting every command at once until the last one ends (each must succeed)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a conversion failed (exit {p.returncode}): {err.strip()[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "moeq2gguf" / "fixtures" / "qwen2moe-tiny"))
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wait-policy", default=None, choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for the conversions (default: unset, i.e. the package's choice)")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if args.wait_policy:
        env["OMP_WAIT_POLICY"] = args.wait_policy
    from moeq2gguf.runtime.bench import machine_info
    from moeq2gguf.runtime.build import cpu_choice
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores; {cpu_choice().summary()}")
    print(f"OMP_WAIT_POLICY={args.wait_policy or '(unset: moeq2gguf sets PASSIVE)'}; "
          f"convert {Path(args.model).name} --type {args.type} --method {args.method}, {args.rounds} rounds")
    model = Path(args.model)
    alone, pair = [], []
    with tempfile.TemporaryDirectory(prefix="bench-shared-cpu-") as tmp:
        out = [Path(tmp) / "a.gguf", Path(tmp) / "b.gguf"]
        timed([convert_cmd(model, out[0], args)], env)    # warm-up: numba's cache, page cache
        for r in range(args.rounds):
            alone.append(timed([convert_cmd(model, out[0], args)], env))
            pair.append(timed([convert_cmd(model, o, args) for o in out], env))
            print(f"round {r + 1}: one alone {alone[-1]:.1f} s, two together {pair[-1]:.1f} s", flush=True)
    a, p = statistics.median(alone), statistics.median(pair)
    print(f"one conversion alone: {a:.1f} s (median); two started together: {p:.1f} s until both finished "
          f"(median); ratio {p / a:.2f}x (target <= 2.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
