#!/usr/bin/env python
"""Peak memory of evaluating several quants of one model (moeq2gguf.eval.evaluate_many), in this checkout and in
another (an earlier commit), with the results of both: the streaming eval must lower the peak and change no number.

    python tools/bench_eval_memory.py --baseline /tmp/before [--model qwen2moe-tiny] [--chunks 8]

Converts the bundled model to F32 and to Q4_K_M, Q3_K_M, Q2_K (rtn) once, then runs evaluate_many over the three in a
fresh process per checkout, interleaved --rounds times; peak RSS is the process's VmHWM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = r'''
import json, sys
from moeq2gguf.eval import evaluate_many
quants, base, chunks = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
results = evaluate_many(quants, base, "eval", chunks=chunks, progress=False)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"peak_rss_mib": peak, "results": [{k: v for k, v in r.__dict__.items() if k not in ("seconds", "quant", "base")} for r in results]}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--baseline-python", default=None)
    ap.add_argument("--model", default="qwen2moe-tiny")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base_dir = Path(args.baseline).resolve()
    sides = {"baseline": (base_dir, args.baseline_python or str(base_dir / ".venv" / "bin" / "python")),
             "this": (REPO, sys.executable)}
    model = REPO / "moeq2gguf" / "fixtures" / args.model
    with tempfile.TemporaryDirectory(prefix="bench-eval-memory-") as tmp:
        from moeq2gguf import convert
        f32 = convert(model, Path(tmp) / "f32.gguf", type="F32", progress=False).output
        quants = [str(convert(model, Path(tmp) / f"{m}.gguf", type=m, progress=False).output)
                  for m in ("Q4_K_M", "Q3_K_M", "Q2_K")]
        peaks: dict[str, list[float]] = {k: [] for k in sides}
        results = {}
        for r in range(args.rounds):
            for k, (checkout, python) in sides.items():
                proc = subprocess.run([python, "-c", WORKER, json.dumps(quants), str(f32), str(args.chunks)],
                                      cwd=checkout, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{k}: {proc.stderr[-2000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                peaks[k].append(out["peak_rss_mib"])
                results[k] = out["results"]
            print(f"round {r + 1}: peak RSS baseline {peaks['baseline'][-1]:.0f} MiB, this {peaks['this'][-1]:.0f} MiB",
                  flush=True)
    b, t = statistics.median(peaks["baseline"]), statistics.median(peaks["this"])
    print(f"evaluate_many of 3 quants ({args.model}, {args.chunks} windows): peak RSS baseline {b:.0f} MiB, this "
          f"{t:.0f} MiB, ratio {t / b:.3f}; results identical: {results['baseline'] == results['this']}")
    for name, r in zip(("Q4_K_M", "Q3_K_M", "Q2_K"), results["this"]):
        print(f"  {name}: KLD mean {r['kld_mean']:.6f}, PPL {r['ppl_quant']:.4f}, same top-1 {r['same_top1_pct']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
