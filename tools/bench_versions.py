#!/usr/bin/env python
"""Wall time of one `moeq2gguf convert` in this checkout against another checkout of the project (an earlier
commit), interleaved round by round, medians and their ratio; each run with a fresh sensitivity cache.

    git worktree add /tmp/before <commit>   # or a clone; it needs its own .venv (make setup) or --baseline-python
    .venv/bin/python tools/bench_versions.py --baseline /tmp/before -- \\
        moeq2gguf/fixtures/mixtral-tiny --method moequant --smooth aggregate --target-bpw 4.9

The model path and options after `--` are passed to both (-o and -q are added). Each side runs in its own
checkout's folder, so `python -c` imports that checkout's package.
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


def run(checkout: Path, python: str, argv: list[str], workdir: Path) -> float:
    out = workdir / "out.gguf"
    env = dict(os.environ, MOEQ2GGUF_CACHE=tempfile.mkdtemp(dir=workdir))
    code = "import sys; from moeq2gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", code, "convert", *argv, "-o", str(out), "-q"], cwd=checkout, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: convert failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out.unlink()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the other checkout")
    ap.add_argument("--baseline-python", default=None, help="its python (default: BASELINE/.venv/bin/python)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("convert_args", nargs=argparse.REMAINDER, help="-- MODEL [convert options]")
    args = ap.parse_args()
    argv = [a for a in args.convert_args if a != "--"]
    argv[0] = str(Path(argv[0]).resolve())
    base = Path(args.baseline).resolve()
    sides = {"baseline": (base, args.baseline_python or str(base / ".venv" / "bin" / "python")),
             "this": (REPO, sys.executable)}
    commits = {k: subprocess.run(["git", "-C", str(c), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for k, (c, _) in sides.items()}
    print(f"convert {' '.join(argv)}; baseline {base} ({commits['baseline']}), this checkout ({commits['this']}); "
          f"{args.rounds} rounds, interleaved")
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        for r in range(args.rounds):
            for k, (checkout, python) in sides.items():
                times[k].append(run(checkout, python, argv, Path(tmp)))
            print(f"round {r + 1}: baseline {times['baseline'][-1]:.1f} s, this {times['this'][-1]:.1f} s", flush=True)
    b, t = statistics.median(times["baseline"]), statistics.median(times["this"])
    print(f"median: baseline {b:.1f} s, this {t:.1f} s; ratio this / baseline {t / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
