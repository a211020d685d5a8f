"""Allocated recipes (convert --target-size) against llama.cpp's fixed mixes at the same file size.

For each bundled reference model and each of llama.cpp's Q4_K_M, Q3_K_M and Q2_K files, convert with
--target-size = that mix's smallest file (llama.cpp rtn, llama.cpp imatrix, or ours with the same
--method; all from tools/bench_quality.py's run in .cache/bench_quality/<model>/) and judge the result
exactly as bench_quality does: evaluate_many([...], f32.gguf, "eval", 512, --chunks) against the F32
GGUF, so the fixed-mix and llama.cpp numbers of its results.json compare with ours. Calibration (the
sensitivity pass and the conversion): 32 windows of 512 tokens of the calib split, as every method there.

usage: python tools/bench_alloc.py [--models mixtral-tiny qwen2moe-tiny] [--mixes Q4_K_M Q3_K_M Q2_K]
                                   [--methods gptq] [--chunks 32] [--reeval] [--write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moeq2gguf import convert  # noqa: E402
from moeq2gguf.eval import evaluate_many  # noqa: E402
# Import every module the run needs now: a long run must not pick up files edited while it works.
import moeq2gguf.plan.alloc, moeq2gguf.quant.sensitivity, moeq2gguf.quant.grid, moeq2gguf.calib.windows  # noqa: E402,E401,F401
import moeq2gguf.models.mixtral, moeq2gguf.models.qwen2moe  # noqa: E402,E401,F401
from bench_quality import bits_per_weight, machine, needs_imatrix, write_section  # noqa: E402  (tools/ is on sys.path when run as a script)

SECTIONS = {"alloc": ("<!-- bench_alloc:begin -->", "<!-- bench_alloc:end -->",
                      "Allocated recipes (--target-size) against the fixed mixes at equal size"),
            "iquants": ("<!-- bench_alloc:iquants:begin -->", "<!-- bench_alloc:iquants:end -->",
                        "Allocated recipes at the i-quant mixes' sizes (issue 23)")}


def bench_model(model: str, mixes: list[str], methods: list[str], chunks: int, ctx: int, calib_windows: int,
                quality_dir: Path, work: Path, reeval: bool) -> list[dict]:
    model_dir = REPO / "moeq2gguf" / "fixtures" / model
    saved = json.loads((quality_dir / "results.json").read_text())["rows"]
    base = quality_dir / "f32.gguf"
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    for mix in mixes:
        for method in methods:
            refs = [quality_dir / f"{mix}-llama-imatrix.gguf", quality_dir / f"{mix}-{method}.gguf"]
            if not needs_imatrix(mix):   # the i-quant mixes have no rtn file
                refs.append(quality_dir / f"{mix}-llama-rtn.gguf")
            missing = [p.name for p in refs if not p.is_file()]
            if missing:
                raise SystemExit(f"{model} {mix}: {', '.join(missing)} missing; run tools/bench_quality.py first")
            budget = min(p.stat().st_size for p in refs)
            fixed_path = quality_dir / f"{mix}-{method}.gguf"
            t0 = time.time()
            result = convert(model_dir, work / f"alloc-{mix}-{method}.gguf", method=method, target_size=budget,
                             calib_windows=calib_windows, calib_ctx=ctx, progress=False)
            print(result.allocation.table(), flush=True)
            jobs.append(dict(mix=mix, method=method, budget=budget, path=result.output, seconds=time.time() - t0,
                             predicted=result.allocation.predicted, fixed_path=fixed_path))
    files = [j["path"] for j in jobs] + ([j["fixed_path"] for j in jobs] if reeval else [])
    results = evaluate_many(files, base, "eval", ctx, chunks, progress=True)
    rows = []
    for n, j in enumerate(jobs):
        res = results[n]
        ref = {r["method"]: r for r in saved if r["mix"] == j["mix"]}
        fixed = ref[f"moeq2gguf {j['method']}"]
        n_bytes, bpw = bits_per_weight(j["path"])
        row = dict(model=model, mix=j["mix"], method=j["method"], budget=j["budget"], file_bytes=j["path"].stat().st_size,
                   bytes=n_bytes, bpw=bpw, kld=res.kld_mean, kld999=res.kld_p99_9, top1=res.same_top1_pct,
                   ppl_ratio=res.ppl_ratio, predicted=j["predicted"], seconds=j["seconds"],
                   fixed_kld=fixed["kld"], fixed_bytes=fixed["bytes"], fixed_bpw=fixed["bpw"],
                   llama_imatrix_kld=ref["llama.cpp imatrix"]["kld"],
                   llama_rtn_kld=ref["llama.cpp rtn"]["kld"] if "llama.cpp rtn" in ref else None)
        if reeval:
            row["fixed_kld_now"] = results[len(jobs) + n].kld_mean
        rows.append(row)
    (work / "results.json").write_text(json.dumps({"rows": [{**r} for r in rows]}, indent=1, default=str))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| model | size of | method | budget (bytes) | file (bytes) | bpw | fixed mix bpw | mean KLD allocated | "
            "predicted | fixed mix (same method) | llama.cpp imatrix | allocated / fixed | allocated / llama.cpp imatrix |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        fixed = r["fixed_kld"] if "fixed_kld_now" not in r else r["fixed_kld_now"]
        lines.append(f"| {r['model']} | {r['mix']} | {r['method']} | {r['budget']} | {r['file_bytes']} | {r['bpw']:.3f} | "
                     f"{r['fixed_bpw']:.3f} | {r['kld']:.5f} | {r['predicted']:.5f} | {fixed:.5f} | {r['llama_imatrix_kld']:.5f} | "
                     f"{r['kld'] / fixed:.3f} | {r['kld'] / r['llama_imatrix_kld']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--methods", nargs="+", default=["gptq"])
    ap.add_argument("--chunks", type=int, default=32, help="eval windows of --ctx tokens")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--quality-dir", default=str(REPO / ".cache" / "bench_quality"), help="tools/bench_quality.py's --workdir")
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench_alloc"))
    ap.add_argument("--reeval", action="store_true", help="evaluate the fixed-mix files again in the same pass")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--section", choices=sorted(SECTIONS), default="alloc", help="which table of BENCHMARKS.md --write replaces")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        rows += bench_model(model, args.mixes, args.methods, args.chunks, args.ctx, args.calib_windows,
                            Path(args.quality_dir) / model, Path(args.workdir) / model, args.reeval)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    wins = sum(r["kld"] < r.get("fixed_kld_now", r["fixed_kld"]) for r in rows)
    begin, end, title = SECTIONS[args.section]
    text = (f"{begin}\n## {title}\n\n"
            f"Command: `python tools/bench_alloc.py {' '.join(sys.argv[1:])}`  \nDate: {datetime.date.today()}  \n"
            f"Machine: {machine()}  \nCommit: {commit}{' (with uncommitted changes)' if dirty else ''}  \n"
            f"Budget: the smallest of llama.cpp's rtn (none for the i-quant mixes) and imatrix files and our fixed-mix file of that mix; the allocated file "
            f"never exceeds it. Eval: {args.chunks} windows of {args.ctx} tokens of the eval split against the F32 GGUF, as "
            f"tools/bench_quality.py; fixed-mix and llama.cpp KLDs from its results.json"
            f"{' (fixed mix re-evaluated in this run)' if args.reeval else ''}. Predicted: the allocator's own KLD estimate.\n\n"
            f"{format_table(rows)}\n\nAllocated below the fixed mix in {wins} of {len(rows)} rows.\n{end}\n")
    print(text)
    if args.write:
        write_section(text, begin, end)


if __name__ == "__main__":
    main()
