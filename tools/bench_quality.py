"""Quality of every method against llama.cpp's own quants, on the bundled reference models.

For each model and type mix: llama.cpp RTN (llama_model_quantize), llama.cpp imatrix (llama-imatrix on
the calib split, then llama-quantize --imatrix), and ours (--method rtn | imatrix | gptq | moequant),
all judged against the model's F32 GGUF on the eval split through llama-cpp-python (PPL, KLD,
same-top-1), plus file size, bits per weight and conversion time. Also checks that our rtn file is
byte-identical to llama.cpp's, that our quantizer fed llama-imatrix's own file is byte-identical to
llama-quantize fed the same file, and cross-checks our eval against llama-perplexity --kl-divergence.

usage: python tools/bench_quality.py [--models mixtral-tiny qwen2moe-tiny DIR@pydoc] [--mixes Q4_K_M Q3_K_M Q2_K]
                                     [--methods rtn imatrix gptq moequant moequant+ebss] [--chunks 32] [--write] [--reuse]

A model is a bundled fixture's name or a model folder; "@pydoc" after it says that it was trained on the Python
documentation's prose (tools/train_fixture.py --corpus pydoc): its eval and calibration text are then the pydoc splits
(moeq2gguf.calib.corpus), llama-imatrix's included; otherwise the stdlib splits.

A method may carry "+" options: +refineN (--refine N), +routingW (--refine-routing W), +ebss (calibrate on EBSS data the
model generates, cached),
+rotate (residual rotation), +smooth (EAQuant's smoothing: aggregation and down-projection scaling), +smoothagg or
+smoothdown (one of the two), +alloc (--target-size at the smaller of llama.cpp's imatrix and rtn files of the mix: the
size allocator instead of the fixed mix), +allocq (as +alloc, plus the bytes of the tensors the patched-runtime
transforms add: the quantized tensors get the stock file's bytes; the same as +alloc without such a transform), +calibstdlib / +calibpydoc / +calibmixed (calibrate on the stdlib calib split,
the pydoc one, or both interleaved, instead of the model's own corpus), +neutralprior (moequant's rare experts blended
with llama.cpp's neutral imatrix prior of one token instead of the layer's pooled Hessian; set on the method for the
row, not a convert option).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moeq2gguf import convert  # noqa: E402
from moeq2gguf.calib import corpus
from moeq2gguf.errors import Moeq2ggufError  # noqa: E402
from moeq2gguf.eval import evaluate_many  # noqa: E402
from moeq2gguf.runtime.llama_tools import llama_perplexity_kld, llama_quantize, llama_tool, run_tool  # noqa: E402
# Import every module the run needs now: a long run must not pick up files edited while it works.
import moeq2gguf.models.mixtral, moeq2gguf.models.qwen2moe, moeq2gguf.quant.grid  # noqa: E402,E401,F401
import moeq2gguf.calib.ebss, moeq2gguf.calib.balance, moeq2gguf.calib.windows  # noqa: E402,E401,F401

# --section NAME writes a table of its own (e.g. the i-quant mixes) between these markers, under this title
SECTIONS = {"quality": ("", "Quality against llama.cpp's own quants"),
            "iquants": (":iquants", "Below 3 bits: the i-quant mixes against llama.cpp's (issue 23)"),
            "refine": (":refine", "Refinement after GPTQ (--refine, issue 24)"),
            "recipe": (":recipe", "The default recipe: gptq, moequant, refinement and the allocator on three models (issue 24)"),
            "calibsource": (":calibsource", "Which calibration text for a model of another domain (issue 24)"),
            "prior": (":prior", "Rare experts: the pooled Hessian or llama.cpp's neutral prior (issue 24)")}


def markers(section: str) -> tuple[str, str, str]:
    tag, title = SECTIONS[section]
    return f"<!-- bench_quality{tag}:begin -->", f"<!-- bench_quality{tag}:end -->", title


def write_section(text: str, begin: str, end: str) -> None:
    """Put a benchmark's section (text, from its begin marker to its end marker) into BENCHMARKS.md: in place of the
    previous one, keeping the sections around it, or at the end the first time."""
    path = REPO / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table is the printed output of the command above it.\n\n"
    if begin in old:
        path.write_text(old[:old.index(begin)] + text + old[old.index(end) + len(end) + 1:])
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + text)


def needs_imatrix(mix: str) -> bool:
    """llama-quantize refuses these mixes without an importance matrix, and so does our rtn."""
    from moeq2gguf.plan.mixes import IMATRIX_MIXES
    return mix in IMATRIX_MIXES


def tensor_digests(path: Path) -> dict[str, str]:
    return {t.name: hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest() for t in gguf.GGUFReader(path).tensors}


def bits_per_weight(path: Path) -> tuple[int, float]:
    reader = gguf.GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    return n_bytes, 8 * n_bytes / n_weights


def compare_digests(a: Path, b: Path) -> str:
    da, db = tensor_digests(a), tensor_digests(b)
    differing = [n for n in da if da[n] != db.get(n)]
    return "byte-identical" if not differing else f"{len(differing)} of {len(da)} tensors differ (first: {differing[0]})"


# "+" options of a --methods entry (e.g. moequant+ebss, gptq+rotate) -> keyword arguments of convert()
METHOD_OPTIONS = {"ebss": {"calib": "ebss"}, "rotate": {"rotate": True}, "smooth": {"smooth": "aggregate,down"},
                  "smoothagg": {"smooth": "aggregate"}, "smoothdown": {"smooth": "down"}, "alloc": {"alloc": True},
                  "allocq": {"alloc": True, "alloc_plus_transforms": True},
                  "calibstdlib": {"calib": "calib"}, "calibpydoc": {"calib": "pydoc-calib"},
                  "calibmixed": {"calib": "mixed-calib"}, "neutralprior": {"rare_prior": "neutral"}}
CORPORA = {"stdlib": ("eval", "calib"), "pydoc": ("pydoc-eval", "pydoc-calib")}   # (eval split, calib split)


@contextlib.contextmanager
def rare_prior(method: str, prior: str | None):
    """The method's rare-expert rule for one row (+neutralprior), restored afterwards."""
    from moeq2gguf import methods
    cls = type(methods.get(method))
    old = cls.blend_rare
    if prior is not None:
        cls.blend_rare = prior
    try:
        yield
    finally:
        cls.blend_rare = old


def model_source(model: str) -> tuple[str, Path, str]:
    """'NAME' or 'DIR[@CORPUS]' -> (row name, model folder, corpus)."""
    spec, _, corpus_name = model.partition("@")
    corpus_name = corpus_name or "stdlib"
    if corpus_name not in CORPORA:
        raise SystemExit(f"--models {model}: unknown corpus @{corpus_name}; known: {', '.join(CORPORA)}")
    bundled = REPO / "moeq2gguf" / "fixtures" / spec
    folder = bundled if bundled.is_dir() else Path(spec).resolve()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--models {model}: neither a bundled fixture nor a model folder with config.json")
    return folder.name, folder, corpus_name


def convert_kwargs(method: str) -> dict:
    """'moequant+ebss' -> {'method': 'moequant', 'rotate': False, 'calib': 'ebss'}"""
    base, *options = method.split("+")
    kwargs = {"method": base, "rotate": False}  # a row says its transforms: not moequant's default rotation
    for o in options:
        if o.startswith("refine") and o[6:].isdigit():   # +refine100: --refine 100
            kwargs["refine"] = int(o[6:])
            continue
        if o.startswith("routing") and o[7:].replace(".", "", 1).isdigit():   # +routing0: --refine-routing 0
            kwargs["refine_routing"] = float(o[7:])
            continue
        if o.startswith("scales") and o[6:].replace(".", "", 1).isdigit():   # +scales0: --refine-scales 0
            kwargs["refine_scales"] = float(o[6:])
            continue
        if o not in METHOD_OPTIONS:
            raise SystemExit(f"--methods {method}: unknown option +{o}; known: {', '.join(METHOD_OPTIONS)}")
        kwargs.update(METHOD_OPTIONS[o])
    return kwargs


def transform_tensor_bytes(model_dir: Path, kwargs: dict) -> int:
    """Bytes of the F32 tensors the patched-runtime transforms add to a file (per-expert smoothing: r_e of every MoE
    layer; the expert Hadamard: its matrix), each padded to GGUF's 32-byte alignment (+allocq's allowance)."""
    from moeq2gguf.models.registry import open_model
    from moeq2gguf.transforms.expert_hadamard import hadamard_block
    adapter = open_model(model_dir)
    spec, n_moe = adapter.spec, sum(s.name.endswith("ffn_gate_inp.weight") for s in adapter.all_tensors())
    adapter.reader.close()
    padded = lambda n: -(-n // 32) * 32   # noqa: E731
    extra = n_moe * padded(4 * spec.n_experts * spec.hidden_size) if kwargs.get("smooth") == "per-expert" else 0
    return extra + (padded(4 * hadamard_block(spec.expert_width) ** 2) if kwargs.get("expert_hadamard") else 0)


def bench_model(model: str, mixes: list[str], methods: list[str], chunks: int, calib_windows: int, ctx: int,
                work: Path, done: set[tuple[str, str]] = frozenset()) -> tuple[list[dict], list[str]]:
    """Rows for every (mix, method) not in `done` (pairs of mix and row label kept from an earlier run)."""
    model, model_dir, corpus_name = model_source(model)
    eval_split, calib_split = CORPORA[corpus_name]
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    base = convert(model_dir, work / "f32.gguf", type="F32", progress=False).output
    calib_file = work / "calib.txt"
    calib_file.write_text(corpus.read_text(calib_split))
    imatrix_file = work / "imatrix.gguf"
    imatrix_seconds = None
    if any("+ebss" in m for m in methods):
        from moeq2gguf.calib.ebss import EBSSConfig, cache_path, cached_ebss, sidecar_path
        t0 = time.time()
        ebss_config = EBSSConfig(n=calib_windows, length=ctx)
        cached = cache_path(model_dir, ebss_config, __import__("torch").device("cpu")).is_file()
        path = cached_ebss(model_dir, ebss_config, device="cpu")
        summary = json.loads(sidecar_path(path).read_text())
        notes.append(f"{model}: EBSS data {calib_windows} x {ctx} tokens ({'cached, ' if cached else ''}generated in "
                     f"{summary['seconds']:.0f} s, {summary['tokens_per_s']:.0f} tok/s on CPU; set sigma {summary['set_sigma']:.4f}); "
                     f"the +ebss rows' time excludes generation ({time.time() - t0:.0f} s this run)")
    files: list[tuple[str, str, Path, float]] = []
    for mix in mixes:
        if (mix, "llama.cpp rtn") not in done and not needs_imatrix(mix):
            t0 = time.time()
            files.append((mix, "llama.cpp rtn", llama_quantize(base, work / f"{mix}-llama-rtn.gguf", mix), time.time() - t0))
        if (mix, "llama.cpp imatrix") not in done or not imatrix_file.is_file():
            if imatrix_seconds is None:
                t0 = time.time()
                run_tool([llama_tool("llama-imatrix"), "-m", base, "-f", calib_file, "-o", imatrix_file, "-c", ctx,
                          "--chunks", calib_windows, "-t", os.cpu_count()])
                imatrix_seconds = time.time() - t0
            t0 = time.time()
            out = work / f"{mix}-llama-imatrix.gguf"
            run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix_file, base, out, mix, str(os.cpu_count())])
            if (mix, "llama.cpp imatrix") not in done:
                files.append((mix, "llama.cpp imatrix", out, time.time() - t0 + imatrix_seconds))
        for method in methods:
            if (mix, f"moeq2gguf {method}") in done or (needs_imatrix(mix) and method.split("+")[0] == "rtn"):
                continue
            kwargs = convert_kwargs(method)
            if kwargs.pop("alloc", False):   # the allocator at llama.cpp's size of this mix, instead of the mix
                refs = [work / f"{mix}-llama-imatrix.gguf"] + ([] if needs_imatrix(mix) else [work / f"{mix}-llama-rtn.gguf"])
                # a run without llama.cpp rtn rows (tools/bench_patched.py) has no rtn file: the imatrix one alone
                kwargs["target_size"] = min(p.stat().st_size for p in refs if p.is_file())
                if kwargs.pop("alloc_plus_transforms", False):
                    kwargs["target_size"] += transform_tensor_bytes(model_dir, kwargs)
            else:
                kwargs["type"] = mix
            if kwargs["method"] != "rtn":
                kwargs.setdefault("calib", calib_split)
            prior = kwargs.pop("rare_prior", None)
            t0 = time.time()
            with rare_prior(kwargs["method"], prior):
                result = convert(model_dir, work / f"{mix}-{method}.gguf", calib_windows=calib_windows,
                                 calib_ctx=ctx, progress=False, **kwargs)
            out = result.output
            if result.report is not None and result.report.refine:   # per layer: loss, routing agreement, time
                out.with_name(out.name + ".refine.json").write_text(json.dumps(
                    {str(k): v for k, v in result.report.refine.items()}, indent=1))
            files.append((mix, f"moeq2gguf {method}", out, time.time() - t0))
        if "rtn" in methods and (mix, "moeq2gguf rtn") not in done and not needs_imatrix(mix):
            notes.append(f"{model} {mix}: our rtn vs llama-quantize: "
                         f"{compare_digests(work / f'{mix}-rtn.gguf', work / f'{mix}-llama-rtn.gguf')}")
        if (mix, "llama.cpp imatrix") not in done:
            ours_with_their_imatrix = convert(model_dir, work / f"{mix}-imatrix-file.gguf", type=mix, imatrix=str(imatrix_file),
                                              progress=False).output
            notes.append(f"{model} {mix}: our quantizer fed llama-imatrix's file vs llama-quantize fed it: "
                         f"{compare_digests(ours_with_their_imatrix, work / f'{mix}-llama-imatrix.gguf')}")
        if "imatrix" in methods and (mix, "moeq2gguf imatrix") not in done:
            notes.append(f"{model} {mix}: our --method imatrix (torch statistics) vs llama.cpp imatrix: "
                         f"{compare_digests(work / f'{mix}-imatrix.gguf', work / f'{mix}-llama-imatrix.gguf')}")
    results = evaluate_many([f for _, _, f, _ in files], base, eval_split, ctx, chunks, progress=True) if files else []
    rows = []
    for (mix, method, path, seconds), res in zip(files, results):
        n_bytes, bpw = bits_per_weight(path)
        rows.append(dict(model=model, mix=mix, method=method, bytes=n_bytes, bpw=bpw, ppl=res.ppl_quant,
                         ppl_ratio=res.ppl_ratio, kld=res.kld_mean, kld999=res.kld_p99_9, top1=res.same_top1_pct,
                         seconds=seconds, ppl_base=res.ppl_base))
    return rows, notes


def cross_check(model: str, rows: list[dict], ctx: int, chunks: int, work: Path) -> str:
    """Our eval against llama-perplexity --kl-divergence on the model's Q4_K_M llama.cpp imatrix file."""
    model, _, corpus_name = model_source(model)
    row = next(r for r in rows if r["model"] == model and r["method"] == "llama.cpp imatrix")
    eval_file = work / "eval.txt"
    eval_file.write_text(corpus.read_text(CORPORA[corpus_name][0]))
    ppl, kld = llama_perplexity_kld(work / "f32.gguf", work / f"{row['mix']}-llama-imatrix.gguf", eval_file, ctx, chunks, work)
    return (f"{model} {row['mix']} llama.cpp imatrix: our eval PPL {row['ppl']:.4f} vs llama-perplexity {ppl:.4f} "
            f"({100 * (row['ppl'] / ppl - 1):+.3f}%), mean KLD {row['kld']:.6f} vs {kld:.6f} ({100 * (row['kld'] / kld - 1):+.2f}%)")


def format_table(rows: list[dict]) -> str:
    head = "| model | mix | method | bytes | bpw | PPL | PPL ratio | mean KLD | KLD 99.9% | same top-1 | time (s) | KLD / llama.cpp imatrix |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        ref = next((x for x in rows if x["model"] == r["model"] and x["mix"] == r["mix"] and x["method"] == "llama.cpp imatrix"), None)
        rel = r["kld"] / ref["kld"] if ref and ref["kld"] > 0 else float("nan")
        lines.append(f"| {r['model']} | {r['mix']} | {r['method']} | {r['bytes']} | {r['bpw']:.3f} | {r['ppl']:.4f} | "
                     f"{r['ppl_ratio']:.4f} | {r['kld']:.5f} | {r['kld999']:.4f} | {r['top1']:.2f}% | {r['seconds']:.1f} | {rel:.3f} |")
    return "\n".join(lines)


def format_refine_layers(rows: list[dict], workdir: Path) -> str:
    """Per refined file and layer (the .refine.json its conversion left): the layer's relative output error and the
    share of calibration tokens whose next-layer top-k expert set is the float model's, GPTQ's -> refined, and the
    seconds the tuning took. Empty when no row was refined."""
    lines = []
    for r in rows:
        method = r["method"].removeprefix("moeq2gguf ")
        path = workdir / r["model"] / f"{r['mix']}-{method}.gguf.refine.json"
        if "refine" not in method or not path.is_file():
            continue
        for bid, x in sorted(json.loads(path.read_text()).items(), key=lambda kv: int(kv[0])):
            agree = ("-" if x["routing_agreement_before"] != x["routing_agreement_before"] else   # NaN: last layer
                     f"{100 * x['routing_agreement_before']:.2f}% -> {100 * x['routing_agreement_after']:.2f}%")
            lines.append(f"| {r['model']} | {r['mix']} | {method} | {bid} | {x['error_before']:.4e} -> "
                         f"{x['error_after']:.4e} | {x['routing_kl_before']:.3e} -> {x['routing_kl_after']:.3e} | {agree} | "
                         f"{100 * x['codes_moved'] / x['codes']:.2f}% | "
                         f"{100 * x.get('scales_moved', 0) / max(x.get('scales', 0), 1):.1f}% | "
                         f"{x['seconds']:.1f} |" if "seconds" in x else
                         f"| {r['model']} | {r['mix']} | {method} | {bid} | (a report without times) |")
    if not lines:
        return ""
    head = ("| model | mix | method | layer | relative output error | next routing KL (last: logits) | "
            "top-k set unchanged (next layer) | codes moved | scales moved | tuning s |")
    return "\n".join([head, "|---" * (head.count("|") - 1) + "|", *lines])


TRANSFORMS = ["", "+rotate", "+smooth", "+rotate+smooth"]


def format_transform_table(rows: list[dict]) -> str:
    """Mean KLD / llama.cpp imatrix's for {gptq, moequant} x {none, rotate, smooth, rotate+smooth}, one line per
    model and mix; '*' marks the lowest of the line. Empty when no transformed rows were run."""
    by = {(r["model"], r["mix"], r["method"]): r for r in rows}
    cells = [(base, t) for base in ("gptq", "moequant") for t in TRANSFORMS]
    if not any(t and (m, x, f"moeq2gguf {b}{t}") in by for (m, x, _) in by for b, t in cells):
        return ""
    head = "| model | mix | " + " | ".join(f"{b}{t or ' (none)'}" for b, t in cells) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    def line(model: str, mix: str, ratios: list[float | None]) -> str:
        best = min((x for x in ratios if x is not None), default=None)
        return f"| {model} | {mix} | " + " | ".join(
            "-" if x is None else f"{x:.3f}{'*' if x == best else ''}" for x in ratios) + " |"

    table: dict[tuple[str, str], list[float | None]] = {}
    for model, mix in dict.fromkeys((r["model"], r["mix"]) for r in rows):
        ref = by.get((model, mix, "llama.cpp imatrix"))
        table[(model, mix)] = [by[(model, mix, f"moeq2gguf {b}{t}")]["kld"] / ref["kld"]
                               if ref and (model, mix, f"moeq2gguf {b}{t}") in by else None for b, t in cells]
        lines.append(line(model, mix, table[(model, mix)]))
    # the recipe is chosen per mix over both models: the mean of the ratios where every model has the cell
    for mix in dict.fromkeys(mix for _, mix in table):
        per_model = [v for (_, m), v in table.items() if m == mix]
        if len(per_model) > 1:
            lines.append(line("mean of models", mix, [None if any(v[i] is None for v in per_model)
                                                      else sum(v[i] for v in per_model) / len(per_model)
                                                      for i in range(len(cells))]))
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "imatrix", "gptq", "moequant"])
    ap.add_argument("--chunks", type=int, default=32, help="eval windows of --ctx tokens")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "bench_quality"))
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--section", choices=sorted(SECTIONS), default="quality",
                    help="which table of BENCHMARKS.md --write replaces (iquants: the i-quant mixes)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the rows of an earlier run's results.json and compute only the missing (mix, method) rows")
    args = ap.parse_args()
    rows, notes = [], []
    for model in args.models:
        work = Path(args.workdir) / model_source(model)[0]
        saved = json.loads((work / "results.json").read_text()) if args.reuse and (work / "results.json").exists() \
            else {"rows": [], "notes": []}
        done = {(r["mix"], r["method"]) for r in saved["rows"]}
        r, n = bench_model(model, args.mixes, args.methods, args.chunks, args.calib_windows, args.ctx, work, done)
        if r:
            commit_now = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
            n.append(f"{model_source(model)[0]}: rows {', '.join(sorted({x['method'] for x in r}))} computed at commit {commit_now}")
        order = {(mix, label): i for i, (mix, label) in enumerate(
            (mix, label) for mix in args.mixes for label in ["llama.cpp rtn", "llama.cpp imatrix"] + [f"moeq2gguf {m}" for m in args.methods])}
        model_rows = sorted(saved["rows"] + r, key=lambda x: order.get((x["mix"], x["method"]), len(order)))
        model_notes = saved["notes"] + [x for x in n if x not in saved["notes"]]
        (work / "results.json").write_text(json.dumps({"rows": model_rows, "notes": model_notes}, indent=1))  # kept if a later model fails
        # the table shows what this command asks for; other saved rows stay in results.json for other sections
        rows += [x for x in model_rows if (x["mix"], x["method"]) in order]
        notes += model_notes
    for model in args.models:
        try:
            notes.append(cross_check(model, rows, args.ctx, args.chunks, Path(args.workdir) / model_source(model)[0]))
        except Moeq2ggufError as e:  # llama-perplexity's output is sometimes cut short on a loaded machine
            notes.append(f"{model}: cross-check against llama-perplexity not done: {e}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    command = "python tools/bench_quality.py " + " ".join(a for a in sys.argv[1:] if a != "--reuse")
    begin, end, title = markers(args.section)
    text = (f"{begin}\n## {title}\n\n"
            f"Command: `{command}`  \nDate: {datetime.date.today()}  \nMachine: {machine()}  \nCommit: {commit}  \n"
            f"Eval: {args.chunks} windows of {args.ctx} tokens of the eval split, second half scored, against the F32 GGUF, "
            f"F32 KV cache (a model marked @pydoc: the pydoc splits, moeq2gguf.calib.corpus). "
            f"Calibration: {args.calib_windows} windows of {args.ctx} tokens of the calib split for every "
            f"calibrated method, llama-imatrix included, except +ebss rows: as many EBSS sequences of as many tokens, generated by "
            f"the model itself (docs/METHODS.md section 5). Time: conversion (llama.cpp imatrix includes llama-imatrix). "
            f"Rows of a model may come from different commits (`--reuse` computes only missing rows): the notes say which.\n\n"
            f"{format_table(rows)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
            + (f"\nMean KLD / llama.cpp imatrix's by transform ('*': lowest of the line):\n\n{transforms}\n"
               if (transforms := format_transform_table(rows)) else "")
            + (f"\n--refine per layer (calibration tokens; 'top-k set unchanged': share of tokens whose next layer picks "
               f"the float model's expert set; time on this machine, tuning alone):\n\n{layers}\n"
               if (layers := format_refine_layers(rows, Path(args.workdir))) else "") + f"{end}\n")
    print(text)
    if args.write:
        write_section(text, begin, end)


if __name__ == "__main__":
    main()
