"""Expert balance of EBSS data against the stdlib calib split, on the bundled reference models.

For each model and tau: generate N x L tokens of EBSS data (moeq2gguf.calib.generate_ebss), then
count expert selections over the EBSS set and over the first N windows of L tokens of the calib
split (exactly the windows `convert --calib calib --calib-windows N --calib-ctx L` calibrates on),
at equal token count. Prints one row per model, source and MoE layer: sigma, the least and most
selected expert's token count; then per EBSS run the generation time, mean log-probability, how
often each guard changed the kept beams, and the magnitudes tau is judged against (spread of -R/l
and of sigma between the beams of a sequence).

usage: python tools/bench_ebss.py [--models mixtral-tiny qwen2moe-tiny or checkpoint folders] [--n 16] [--len 256]
                                  [--tau 0.005 ...] [--balance candidate parent] [--threads 1] [--device cpu] [--out DIR]
       python tools/bench_ebss.py --tables DIR/results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moeq2gguf.calib import EBSSConfig, balance_report, generate_ebss  # noqa: E402
from moeq2gguf.calib.balance import load_model, resolve_device  # noqa: E402
from moeq2gguf.calib.ebss import DEFAULT_TAU, cache_path, sidecar_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--tau", type=float, nargs="+", default=[DEFAULT_TAU])
    ap.add_argument("--batch", type=int, default=EBSSConfig.batch_sequences, help="sequences per batch")
    ap.add_argument("--balance", nargs="+", default=["candidate"], choices=["parent", "candidate"],
                    help="sigma of the parent beam (docs/METHODS.md literally) and/or of each candidate; crossed with --tau")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest on a shared CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="write results.json here (the EBSS data itself goes to the EBSS cache)")
    ap.add_argument("--tables", default=None, metavar="RESULTS_JSON", help="only print the tables of an earlier run")
    args = ap.parse_args()
    if args.tables:
        saved = json.loads(Path(args.tables).read_text())
        print_tables(saved.get("header", "EBSS vs calib split at equal token count"), saved["rows"], saved["runs"])
        return
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path("/tmp/bench_ebss")
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, runs = [], []
    for name in args.models:
        model_dir = Path(name) if Path(name).is_dir() else REPO / "moeq2gguf" / "fixtures" / name   # a folder, or a bundled model
        device = resolve_device(args.device)
        model = load_model(model_dir, device)
        for balance, tau in [(b, t) for b in args.balance for t in args.tau]:
            cfg = EBSSConfig(n=args.n, length=args.len, beams=args.beams, topk=args.topk, tau=tau, batch_sequences=args.batch,
                             balance=balance)
            # the same cache `convert --calib ebss` reads, so tools/bench_quality.py reuses this data
            path = cache_path(model_dir, cfg, device)
            if path.is_file() and sidecar_path(path).is_file():
                summary = json.loads(sidecar_path(path).read_text())
                print(f"reusing {path} (generated in {summary['seconds']:.0f} s)")
            else:
                summary = generate_ebss(model_dir, path, cfg, progress=True, model=model).summary()
            t0 = time.perf_counter()
            stats = balance_report(model_dir, [str(path), "calib"], model=model)
            count_s = time.perf_counter() - t0
            runs.append({"model": name, "tau": tau, "balance": balance, **summary, "count_seconds": count_s, "file": str(path)})
            for s, label in zip(stats, (f"ebss {balance[:4]} {tau:g}", "calib split")):
                if label == "calib split" and any(r["model"] == name and r["source"] == label for r in rows):
                    continue
                rows.append({"model": name, "source": label, "tokens": s.n_tokens, "sigma": s.sigma,
                             "layers": [(b, float(ls), int(c.min()), int(c.max())) for b, ls, c in
                                        zip(s.layer_ids, s.layer_sigma, s.counts)],
                             "seconds": summary["seconds"] if label.startswith("ebss") else None})

    header = f"EBSS vs calib split at equal token count ({args.n} x {args.len} tokens, {args.beams} beams, top-{args.topk})"
    (out_dir / "results.json").write_text(json.dumps({"header": header, "rows": rows, "runs": runs}, indent=1) + "\n")
    print_tables(header, rows, runs)


def print_tables(header: str, rows: list[dict], runs: list[dict]) -> None:
    print(f"\n{header}")
    print(f"{'model':14} {'source':18} {'tokens':>7} {'sigma':>7} {'gen s':>6}  per layer: sigma min/max expert tokens")
    for r in rows:
        layers = "  ".join(f"L{b} {ls:.3f} {lo}/{hi}" for b, ls, lo, hi in r["layers"])
        secs = f"{r['seconds']:6.0f}" if r["seconds"] is not None else f"{'':>6}"
        print(f"{r['model']:14} {r['source']:18} {r['tokens']:>7} {r['sigma']:7.4f} {secs}  {layers}")
    print("\nleast-used expert per layer, EBSS vs calib split ('>': EBSS gives it more tokens; 0=0: an expert no text reaches)")
    for r in rows:
        if not r["source"].startswith("ebss"):
            continue
        calib = next(c for c in rows if c["model"] == r["model"] and c["source"] == "calib split")
        marks = []
        for (b, _, lo, _), (_, _, clo, _) in zip(r["layers"], calib["layers"]):
            marks.append(f"L{b} {lo}{'>' if lo > clo else '=' if lo == clo else '<'}{clo}")
        print(f"{r['model']:14} {r['source']:18} sigma {r['sigma']:.4f} vs {calib['sigma']:.4f}  " + "  ".join(marks))
    print("\nper EBSS run: mean log-prob, tokens/s, guard firings (steps whose kept beams the guard changed), tau scale")
    for r in runs:
        guards = " ".join(f"{g}={v['changed']}/{v['of']}" for g, v in r["guards"].items())
        sc = r["scale"]
        print(f"{r['model']:14} {r['balance']:9} tau={r['tau']:<5g} logp/token {r['mean_logprob']:.3f}  {r['tokens_per_s']:.0f} tok/s  {guards}  "
              f"beam -R/l spread {sc['median_beam_nll_spread']:.4f}, beam sigma spread {sc['median_beam_sigma_spread']:.4f}, "
              f"mean sigma {sc['mean_beam_sigma']:.4f}, mean -R/l {sc['mean_nll']:.3f}"
              + (f"; per candidate: std -R/l {sc['median_candidate_nll_std']:.4f}, std sigma {sc['median_candidate_sigma_std']:.5f}"
                 if r["balance"] == "candidate" else ""))


if __name__ == "__main__":
    main()
