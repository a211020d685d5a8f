"""Measure alloc.CLASS_COEFFS: predicted KLD per unit of measured reconstruction error, per tensor class.

The allocator's errors (quant/sensitivity.py) live in each linear's own output space; this puts them on
the scale of the quantity we minimise, the mean KL divergence of the next-token distribution. For each
reference model and each tensor class it has, one file per type in --types is written with --method gptq
(the class's tensors at that type, llama.cpp's fallback where a row does not divide; every other tensor
F32), and its mean KLD against the model's F32 GGUF (eval split, 512-token windows, scored as
tools/bench_quality.py does) is divided by the class's summed predicted error at that type (the same
calibration as the conversion: 32 windows of 512 tokens of the calib split). A class's coefficient is the
geometric mean of its ratios over models and types. The run ends with a check of additivity: the
predicted KLD of each fixed llama.cpp mix (every class at once) next to the KLD tools/bench_quality.py
measured for its gptq file, when that run's results.json is there.

usage: python tools/fit_alloc_coeffs.py [--models mixtral-tiny qwen2moe-tiny] [--types Q2_K Q3_K] [--chunks 32]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import gguf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moeq2gguf import convert  # noqa: E402
from moeq2gguf.plan import alloc
from moeq2gguf.eval import evaluate_many  # noqa: E402
from moeq2gguf.plan.mixes import allows_quantization, assign_types  # noqa: E402
from moeq2gguf.models.registry import open_model  # noqa: E402
from moeq2gguf.passes.quantize import QuantConfig  # noqa: E402
from moeq2gguf.quant.sensitivity import cached_measure  # noqa: E402
# Import every module the run needs now: a long run must not pick up files edited while it works.
import moeq2gguf.models.mixtral, moeq2gguf.models.qwen2moe, moeq2gguf.quant.grid, moeq2gguf.calib.windows  # noqa: E402,E401,F401

Q = gguf.GGMLQuantizationType


def sensitivities(model_dir: Path, method: str, windows: int, ctx: int):
    adapter = open_model(model_dir)
    try:
        sources = adapter.all_tensors()
        candidates = {s.name: alloc.candidate_types(s.shape) for s in sources if allows_quantization(s.name, len(s.shape))}
        sens = cached_measure(adapter, sources, candidates, QuantConfig(method=method, n_windows=windows, ctx=ctx))
        return adapter.spec, sources, sens
    finally:
        adapter.reader.close()


def predicted(sources, sens, types: dict[str, Q], coeffs: dict[str, float] | None = None) -> float:
    tied = not any(s.name == "output.weight" for s in sources)
    total = 0.0
    for s in sources:
        if s.name in types and s.name in sens:
            c = 1.0 if coeffs is None else coeffs[alloc.tensor_class(s.name, tied)]
            total += c * sens[s.name][alloc.fallback_type(types[s.name], s.shape[-1]).name]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K"])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--chunks", type=int, default=32, help="eval windows of --ctx tokens")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "fit_alloc_coeffs"))
    args = ap.parse_args()
    ratios: dict[str, list[float]] = {}
    rows = []
    fitted_inputs = {}
    for model in args.models:
        model_dir = REPO / "moeq2gguf" / "fixtures" / model
        work = Path(args.workdir) / model
        work.mkdir(parents=True, exist_ok=True)
        base = REPO / ".cache" / "bench_quality" / model / "f32.gguf"
        if not base.is_file():
            base = convert(model_dir, work / "f32.gguf", type="F32", progress=False).output
        spec, sources, sens = sensitivities(model_dir, args.method, args.calib_windows, args.ctx)
        fitted_inputs[model] = (spec, sources, sens)
        tied = not any(s.name == "output.weight" for s in sources)
        classes: dict[str, list[str]] = {}
        for s in sources:
            if allows_quantization(s.name, len(s.shape)):
                classes.setdefault(alloc.tensor_class(s.name, tied), []).append(s.name)
        files = []
        for cls, names in classes.items():
            done = set()
            for t in args.types:
                # rows a type's block does not divide fall back (Q2_K and Q3_K both to Q4_0): fit each file once
                actual = tuple(alloc.fallback_type(Q[t], s.shape[-1]) for s in sources if s.name in names)
                if actual in done:
                    continue
                done.add(actual)
                out = work / f"{cls}-{t}-{args.method}.gguf"
                pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
                if not out.is_file():
                    convert(model_dir, out, type="Q8_0", method=args.method, calib_windows=args.calib_windows,
                            calib_ctx=args.ctx, tensor_types=(f"{pattern}={t}", ".*=F32"), progress=False)
                pred = predicted(sources, sens, {n: Q[t] for n in names})
                files.append((cls, t, out, pred))
        # KLDs of files already judged (same file, same eval settings) are kept in kld.json: a re-fit after a change
        # to the measurement only measures again
        kld_file = work / "kld.json"
        known = json.loads(kld_file.read_text()) if kld_file.is_file() else {}
        key = {f: f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}:{args.ctx}:{args.chunks}" for _, _, f, _ in files}
        todo = [f for _, _, f, _ in files if key[f] not in known]
        if todo:
            for f, res in zip(todo, evaluate_many(todo, base, "eval", args.ctx, args.chunks, progress=True)):
                known[key[f]] = res.kld_mean
            kld_file.write_text(json.dumps(known, indent=1) + "\n")
        for cls, t, f, pred in files:
            kld = known[key[f]]
            ratios.setdefault(cls, []).append(kld / pred)
            rows.append((model, cls, t, pred, kld, kld / pred))
    print("| model | class | type | predicted error | mean KLD | KLD / error |\n|---|---|---|---|---|---|")
    for model, cls, t, pred, kld, ratio in rows:
        print(f"| {model} | {cls} | {t} | {pred:.4e} | {kld:.5f} | {ratio:.4e} |")
    coeffs = {cls: math.exp(sum(map(math.log, r)) / len(r)) for cls, r in ratios.items()}
    spread = {cls: max(r) / min(r) for cls, r in ratios.items()}
    print("\nCLASS_COEFFS = {")
    for cls, c in coeffs.items():
        print(f'    "{cls}": {c:.4g},   # {len(ratios[cls])} fits, max/min ratio {spread[cls]:.2f}')
    print("}")
    # additivity: every class at once, the fixed llama.cpp mixes, against what bench_quality measured
    print("\n| model | mix | predicted KLD | measured KLD (bench_quality, gptq) | measured / predicted |\n|---|---|---|---|---|")
    for model, (spec, sources, sens) in fitted_inputs.items():
        results_file = REPO / ".cache" / "bench_quality" / model / "results.json"
        if not results_file.is_file():
            continue
        measured = {r["mix"]: r["kld"] for r in json.loads(results_file.read_text())["rows"] if r["method"] == f"moeq2gguf {args.method}"}
        for mix, kld in measured.items():
            types = assign_types([(s.name, s.shape) for s in sources], mix, n_layer=spec.n_layers, n_expert=spec.n_experts,
                                 n_head=spec.n_heads, n_head_kv=spec.n_kv_heads, has_imatrix=True)
            pred = predicted(sources, sens, {s.name: t for s, t in zip(sources, types) if s.name in sens}, coeffs)
            print(f"| {model} | {mix} | {pred:.5f} | {kld:.5f} | {kld / pred:.3f} |")


if __name__ == "__main__":
    main()
