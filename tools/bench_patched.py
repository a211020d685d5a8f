"""Quality and CPU speed of the patched-runtime features (--smooth per-expert, --expert-hadamard) against moequant.

Quality: for each bundled model and type mix, tools/bench_quality.py's own bench_model() converts each --bases
method (moequant: the stock-compatible reference, without rotation; moequant+rotate: with the residual rotation
that --method moequant applies by default), and each base + --smooth per-expert (+perexpert), + --expert-hadamard
(+ehadamard) and + both, next to llama.cpp imatrix (llama-imatrix on the calib split, then llama-quantize), all
with this checkout's code in --workdir, and judges them in one evaluate_many pass against the F32
GGUF exactly as bench_quality does (--chunks windows of --ctx tokens of the eval split). That pass runs on
the patched llama.cpp (evaluate_many moves to it when a file needs it); the stock files are evaluated
again on the stock llama.cpp to show that the patch leaves their figures unchanged, and the llama.cpp imatrix
and moequant figures are compared with bench_quality's results.json (read only) where it has them.

Speed: for each model and mix, on the first base's files, moeq2gguf.runtime.bench (one fresh worker process per measurement: --ctx-tokens prompt in
one llama_decode, --gen greedy tokens) of (a) the stock llama.cpp on the moequant file, (b) the patched
llama.cpp on the same file, (c) the patched llama.cpp on the +perexpert, +ehadamard and +both files, at each
--threads count, interleaved: --rounds rounds, each running every configuration once (--repeats timed runs
after a warm-up) in an order rotated by one per round. tok/s: median of all timed runs; ratio to (a): median
over rounds of the round's medians divided by (a)'s of the same round (range over rounds in brackets).

usage: python tools/bench_patched.py [--models mixtral-tiny qwen2moe-tiny] [--mixes Q4_K_M Q3_K_M Q2_K]
                                     [--bases moequant moequant+rotate] [--threads 1 2] [--rounds 5] [--repeats 3]
                                     [--write] [--reuse] [--no-speed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import bench_quality  # noqa: E402  (imports every module a conversion needs, as its long runs want)
from bench_quality import CORPORA, bench_model, compare_digests, machine, model_source  # noqa: E402
from moeq2gguf import runtime  # noqa: E402
from moeq2gguf.runtime import build as runtime_build
from moeq2gguf.runtime.bench import bench_file, machine_info  # noqa: E402
from moeq2gguf.eval import evaluate_many  # noqa: E402
import moeq2gguf.transforms.patched, moeq2gguf.transforms.expert_smoothing  # noqa: E402,E401,F401
import moeq2gguf.transforms.expert_hadamard  # noqa: E402,F401

def git_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


# the code this run converts with: the modules imported above, i.e. the checkout as the run started
START_COMMIT = git_commit()
# --section: which table of BENCHMARKS.md --write replaces (its markers and title)
SECTIONS = {"main": ("", "Patched-runtime features: per-expert smoothing and the expert Hadamard against moequant"),
            "lowbit": (":lowbit", "Patched-runtime features below 3 bits: the decision grid (issue 26)")}
# the patched-runtime features as "+" options of bench_quality's --methods entries
bench_quality.METHOD_OPTIONS.update({"perexpert": {"smooth": "per-expert"}, "ehadamard": {"expert_hadamard": True}})
FEATURES = ["+perexpert", "+ehadamard", "+perexpert+ehadamard"]
IMATRIX = "llama.cpp imatrix"


def reference(base: str) -> str:
    """The row a base's features are compared with: +allocq without a feature is +alloc (the same budget and file)."""
    return base.replace("+allocq", "+alloc")


def variants(base: str) -> list[str]:
    """bench_quality --methods entries: the base (unless it is another base's file) and the base with each feature"""
    return ([base] if reference(base) == base else []) + [base + f for f in FEATURES]


def base_of(label: str) -> str:
    """'moeq2gguf moequant+rotate+perexpert' -> 'moeq2gguf moequant+rotate'"""
    for f in sorted(FEATURES, key=len, reverse=True):
        if label.endswith(f):
            return label[: -len(f)]
    return label


def configs(base: str) -> list[tuple[str, bool, str]]:
    """speed configurations: (label, patched runtime, file method)"""
    return [("(a) stock", False, base), ("(b) patched", True, base)] + [("(c) patched", True, m) for m in variants(base)[1:]]


def quality(model: str, mixes: list[str], bases: list[str], chunks: int, calib_windows: int, ctx: int, work: Path,
            quality_dir: Path, reuse: bool) -> tuple[list[dict], list[str]]:
    model_arg = model
    methods = [m for b in bases for m in variants(b)]
    labels = [IMATRIX] + [f"moeq2gguf {m}" for m in methods]
    saved = json.loads((work / "results.json").read_text()) if reuse and (work / "results.json").is_file() else {}
    saved_rows = [r for r in saved.get("rows", []) if r["mix"] in mixes and r["method"] in labels]
    done = {(mix, "llama.cpp rtn") for mix in mixes} | {(r["mix"], r["method"]) for r in saved_rows}
    rows, notes = bench_model(model, mixes, methods, chunks, calib_windows, ctx, work, done)
    model, _, corpus_name = model_source(model)
    if rows:
        notes.append(f"{model}: rows {', '.join(sorted({r['method'] for r in rows}))} computed with the code of commit "
                     f"{START_COMMIT} (as this run started), evaluated in one pass on the "
                     f"{'patched' if any(base_of(r['method']) != r['method'] for r in rows) else 'stock'} llama.cpp")
    notes = [n for n in saved.get("notes", []) if n not in notes and "evaluated again on the" not in n
             and "results.json" not in n] + notes
    order = {(mix, label): i for i, (mix, label) in enumerate((mix, label) for mix in mixes for label in labels)}
    rows = sorted(saved_rows + rows, key=lambda r: order[(r["mix"], r["method"])])

    # the stock files once more, on the llama.cpp this process runs (stock unless LLAMA_CPP_LIB_PATH says otherwise)
    stock_labels = [IMATRIX] + [f"moeq2gguf {b}" for b in bases]
    stock_files = [(r, work / (f"{r['mix']}-llama-imatrix.gguf" if r["method"] == IMATRIX
                               else f"{r['mix']}-{r['method'].removeprefix('moeq2gguf ')}.gguf"))
                   for r in rows if r["method"] in stock_labels]
    again = evaluate_many([p for _, p in stock_files], work / "f32.gguf", CORPORA[corpus_name][0], ctx, chunks,
                          progress=True)
    same = sum(a.kld_mean == r["kld"] and a.ppl_quant == r["ppl"] and a.same_top1_pct == r["top1"]
               for (r, _), a in zip(stock_files, again))
    worst = max(abs(a.kld_mean / r["kld"] - 1) for (r, _), a in zip(stock_files, again))
    notes.append(f"{model}: the {len(stock_files)} stock files ({', '.join(stock_labels)}) evaluated again on the "
                 f"{'patched' if runtime.is_patched() else 'stock'} llama.cpp: PPL, mean KLD and same top-1 identical for "
                 f"{same} of {len(stock_files)} (largest relative mean-KLD difference {worst:.1e})")

    # bench_quality's own run (read only), where it has these rows: same protocol, other commit
    theirs_path = quality_dir / "results.json"
    theirs = {(r["mix"], r["method"]): r for r in json.loads(theirs_path.read_text())["rows"]} if theirs_path.is_file() else {}
    same_f32 = (quality_dir / "f32.gguf").is_file() and compare_digests(work / "f32.gguf", quality_dir / "f32.gguf")
    for label in stock_labels:
        pairs = [(r, theirs[(r["mix"], label)]) for r in rows if r["method"] == label and (r["mix"], label) in theirs]
        if pairs:
            notes.append(f"{model}: {label} mean KLD here vs tools/bench_quality.py's results.json: " + ", ".join(
                f"{r['mix']} {r['kld']:.5f} vs {t['kld']:.5f}" for r, t in pairs)
                + (f" (F32 GGUF here vs there: {same_f32})" if label == IMATRIX and same_f32 else ""))
    sizes = {mix: (work / f"{mix}-llama-imatrix.gguf").stat().st_size for mix in mixes
             if (work / f"{mix}-llama-imatrix.gguf").is_file()}
    if sizes:
        _, model_dir, _ = model_source(model_arg)
        extra = {f: bench_quality.transform_tensor_bytes(model_dir, bench_quality.METHOD_OPTIONS[f[1:]]) for f in FEATURES[:2]}
        notes = [n for n in notes if "the transforms' own F32 tensors" not in n] + [
            f"{model}: the transforms' own F32 tensors: " + ", ".join(f"{f} {b} bytes" for f, b in extra.items())
            + "; of llama.cpp imatrix's file: " + ", ".join(
                f"{mix} " + " / ".join(f"{100 * b / size:.1f}%" for b in extra.values()) for mix, size in sizes.items())]
    (work / "results.json").write_text(json.dumps({**saved, "rows": rows, "notes": notes}, indent=1))
    return rows, notes


def speed(model: str, mixes: list[str], base: str, work: Path, threads: list[int], rounds: int, repeats: int, ctx: int,
          gen: int) -> list[dict]:
    CONFIGS = configs(base)
    runs: dict[tuple, dict[str, list]] = {}
    t_start = time.time()
    for rnd in range(rounds):
        for mix in mixes:
            for n in threads:
                shift = rnd % len(CONFIGS)
                for label, patched, method in CONFIGS[shift:] + CONFIGS[:shift]:
                    [row] = bench_file(work / f"{mix}-{method}.gguf", threads=(n,), ctx=ctx, gen=gen, repeats=repeats,
                                       patched=patched)
                    assert row.runtime == ("patched" if patched else "stock"), row.runtime
                    r = runs.setdefault((mix, n, label, method), {"pp": [], "tg": [], "pp_round": [], "tg_round": [],
                                                                  "rss": []})
                    r["pp"] += row.pp_runs
                    r["tg"] += row.tg_runs
                    r["pp_round"].append(row.pp_tok_s)
                    r["tg_round"].append(row.tg_tok_s)
                    r["rss"].append(row.peak_rss_mib)
        print(f"{model}: speed round {rnd + 1}/{rounds} done ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)
    out = []
    for mix in mixes:
        for n in threads:
            ref = runs[(mix, n, CONFIGS[0][0], CONFIGS[0][2])]
            for label, patched, method in CONFIGS:
                r = runs[(mix, n, label, method)]
                pp_ratios = [a / b for a, b in zip(r["pp_round"], ref["pp_round"])]
                tg_ratios = [a / b for a, b in zip(r["tg_round"], ref["tg_round"])]
                out.append(dict(model=model, mix=mix, threads=n, config=label, runtime="patched" if patched else "stock",
                                method=method, pp=statistics.median(r["pp"]), tg=statistics.median(r["tg"]),
                                pp_ratio=statistics.median(pp_ratios), pp_ratio_range=[min(pp_ratios), max(pp_ratios)],
                                tg_ratio=statistics.median(tg_ratios), tg_ratio_range=[min(tg_ratios), max(tg_ratios)],
                                rss=statistics.median(r["rss"]), pp_runs=r["pp"], tg_runs=r["tg"]))
    return out


def quality_table(rows: list[dict]) -> str:
    head = ("| model | mix | method | bytes | bpw | PPL | PPL ratio | mean KLD | KLD 99.9% | same top-1 | time (s) | "
            "KLD / base | KLD / llama.cpp imatrix |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        def kld_of(label: str) -> float:
            ref = next((x for x in rows if x["model"] == r["model"] and x["mix"] == r["mix"] and x["method"] == label), None)
            return ref["kld"] if ref and ref["kld"] > 0 else float("nan")
        lines.append(f"| {r['model']} | {r['mix']} | {r['method']} | {r['bytes']} | {r['bpw']:.3f} | {r['ppl']:.4f} | "
                     f"{r['ppl_ratio']:.4f} | {r['kld']:.5f} | {r['kld999']:.4f} | {r['top1']:.2f}% | {r['seconds']:.1f} | "
                     f"{r['kld'] / kld_of(reference(base_of(r['method']))):.3f} | {r['kld'] / kld_of(IMATRIX):.3f} |")
    return "\n".join(lines)


def quality_summary(rows: list[dict], bases: list[str]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for base in bases:
            ref = {r["mix"]: r["kld"] for r in rows if r["model"] == model and r["method"] == f"moeq2gguf {reference(base)}"}
            for method in [base + f for f in FEATURES]:
                mine = [r for r in rows if r["model"] == model and r["method"] == f"moeq2gguf {method}" and r["mix"] in ref]
                if mine:
                    wins = sum(r["kld"] < ref[r["mix"]] for r in mine)
                    out.append(f"{model} {method}: mean KLD below {reference(base)}'s at {wins} of {len(mine)} mixes (ratios "
                               + ", ".join(f"{r['mix']} {r['kld'] / ref[r['mix']]:.3f}" for r in mine) + ")")
    return out


def speed_table(rows: list[dict]) -> str:
    head = ("| model | mix | threads | runtime | file | pp tok/s | tg tok/s | pp / (a) [range] | tg / (a) [range] | "
            "peak RSS MiB |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mix']} | {r['threads']} | {r['config']} | {r['method']} | {r['pp']:.1f} | "
                     f"{r['tg']:.1f} | {r['pp_ratio']:.3f} [{r['pp_ratio_range'][0]:.2f}-{r['pp_ratio_range'][1]:.2f}] | "
                     f"{r['tg_ratio']:.3f} [{r['tg_ratio_range'][0]:.2f}-{r['tg_ratio_range'][1]:.2f}] | {r['rss']:.1f} |")
    return "\n".join(lines)


def speed_summary(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for label, _, method in dict.fromkeys((r["config"], r["runtime"] == "patched", r["method"]) for r in rows
                                              if r["model"] == model and not r["config"].startswith("(a)")):
            for n in dict.fromkeys(r["threads"] for r in rows):
                sel = [r for r in rows if r["model"] == model and r["config"] == label and r["method"] == method
                       and r["threads"] == n]
                if sel:
                    out.append(f"{model} {label} {method}, {n} thread{'s' if n > 1 else ''}: median over mixes pp "
                               f"{statistics.median(r['pp_ratio'] for r in sel):.3f}, tg "
                               f"{statistics.median(r['tg_ratio'] for r in sel):.3f} x (a)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--bases", nargs="+", default=["moequant", "moequant+rotate"],
                    help="bench_quality --methods entries the features are added to; speed runs on the first one's files")
    ap.add_argument("--chunks", type=int, default=32, help="eval windows of --ctx tokens (as bench_quality)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512, help="eval and calibration window (as bench_quality)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per worker, after its warm-up")
    ap.add_argument("--ctx-tokens", type=int, default=512, help="speed: prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="speed: generated tokens")
    ap.add_argument("--no-speed", action="store_true", help="quality only (an earlier run's speed rows are kept with --reuse)")
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench_patched"))
    ap.add_argument("--quality-dir", default=str(REPO / ".cache" / "bench_quality"),
                    help="tools/bench_quality.py's --workdir, read only: its results.json for comparison")
    ap.add_argument("--reuse", action="store_true", help="keep quality rows of an earlier run's results.json")
    ap.add_argument("--section", choices=sorted(SECTIONS), default="main",
                    help="which table of BENCHMARKS.md --write replaces (lowbit: the i-quant decision grid)")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = ap.parse_args()
    lib = runtime_build.build().lib_dir   # cached; builds the patched llama.cpp when missing
    # every patched process of this run (evaluation, benchmark workers) binds this build, even if runtime_patches/ or
    # runtime_build.py change while the run works
    runtime_build.cached_lib_dir = lambda cuda=False: lib
    t0 = time.time()
    rows, notes, speed_rows = [], [], []
    for model in args.models:
        name = model_source(model)[0]
        work = Path(args.workdir) / name
        r, n = quality(model, args.mixes, args.bases, args.chunks, args.calib_windows, args.ctx, work, Path(args.quality_dir) / name,
                       args.reuse)
        rows += r
        notes += n
        saved = json.loads((work / "results.json").read_text())
        if args.no_speed:
            speed_rows += [s for s in saved.get("speed", []) if s["mix"] in args.mixes and s["method"] in variants(args.bases[0])]
            continue
        s = speed(model, args.mixes, args.bases[0], work, args.threads, args.rounds, args.repeats, args.ctx_tokens, args.gen)
        (work / "results.json").write_text(json.dumps({**saved, "speed": s}, indent=1))
        speed_rows += s
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = (env + " " if env else "") + "python tools/bench_patched.py " + " ".join(a for a in sys.argv[1:] if a != "--reuse")
    info = machine_info()
    tag, title = SECTIONS[args.section]
    MARK_BEGIN, MARK_END = f"<!-- bench_patched{tag}:begin -->", f"<!-- bench_patched{tag}:end -->"
    text = (f"{MARK_BEGIN}\n## {title}\n\n"
            f"Command: `{command}`  \nDate: {datetime.date.today()}  \nMachine: {machine()}, load average "
            f"{os.getloadavg()[0]:.1f} at the end (shared with other jobs), this run at nice {os.nice(0)}  \n"
            f"Commit: {START_COMMIT}{f' (HEAD at the end: {end})' if (end := git_commit()) != START_COMMIT else ''}  \n"
            f"Patched llama.cpp: {lib} (runtime_patches/), stock: llama-cpp-python {info['llama_cpp_python']}'s own. "
            f"Wall time of this run: {time.time() - t0:.0f} s.\n\n"
            f"Quality: eval {args.chunks} windows of {args.ctx} tokens of the eval split (pydoc-eval for a model marked @pydoc), second half scored, against the F32 "
            f"GGUF, F32 KV cache, as tools/bench_quality.py (its bench_model() converts and evaluates). Calibration: "
            f"{args.calib_windows} windows of {args.ctx} tokens of the calib split for every method, llama-imatrix and the "
            f"per-expert smoothing statistics included. +perexpert: `--smooth per-expert`; +ehadamard: `--expert-hadamard` "
            f"(files only the patched llama.cpp runs); +rotate: `--rotate` (every other row: `--no-rotate`); +alloc: "
            f"`--target-size` at the size of llama.cpp imatrix's file of the mix instead of the mix's types (the size "
            f"allocator, its sensitivity measured on the transformed model), so every +alloc row of a mix has the same bytes; "
            f"+allocq: as +alloc plus the bytes of the transforms' own F32 tensors (ffn_exps_smooth, the Hadamard matrix), "
            f"so the quantized tensors of every +allocq row have the stock file's bytes (the notes give those tensors' bytes "
            f"per model: a large part of these tiny files, a small one of a real model's). "
            f"KLD / base: against the row's method without +perexpert / +ehadamard (for +allocq, the +alloc row). Time: conversion wall time (llama.cpp imatrix "
            f"includes llama-imatrix), which other jobs on the machine stretch.\n\n"
            f"{quality_table(rows)}\n\n" + "\n".join(f"- {n}" for n in quality_summary(rows, args.bases) + notes) + "\n")
    if speed_rows:
        text += (f"\nSpeed on CPU (moeq2gguf.runtime.bench, a fresh worker process per measurement): prompt {args.ctx_tokens} tokens "
                 f"of the eval split in one llama_decode (pp), then {args.gen} greedy tokens (tg); {args.rounds} interleaved "
                 f"rounds, each running every configuration once ({args.repeats} timed runs after a warm-up), in an order "
                 f"rotated by one per round. tok/s: median of all {args.rounds * args.repeats} timed runs; ratio: median over "
                 f"rounds of the configuration's round median over (a)'s of the same round, [min-max over rounds]. "
                 f"(a) stock llama.cpp on the {args.bases[0]} file, (b) patched llama.cpp on the same file, (c) patched "
                 f"llama.cpp on the {args.bases[0]} files with the features. The machine's 2 cores were shared with other jobs: the 2-thread rows measure "
                 f"contention as much as scaling.\n\n{speed_table(speed_rows)}\n\n"
                 + "\n".join(f"- {n}" for n in speed_summary(speed_rows)) + "\n")
    text += f"{MARK_END}\n"
    print(text)
    if args.write:
        path = REPO / "BENCHMARKS.md"
        old = path.read_text()
        if MARK_BEGIN in old:   # replace the section in place, keeping the ones around it
            path.write_text(old[:old.index(MARK_BEGIN)] + text + old[old.index(MARK_END) + len(MARK_END) + 1:])
        else:
            path.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
