"""Command line: one subcommand per public function, with the same parameters."""
from __future__ import annotations

import argparse
import logging
import sys

from moeq2gguf.errors import Moeq2ggufError


def _convert(args: argparse.Namespace) -> None:
    from moeq2gguf.commands.convert import convert
    from moeq2gguf.config import ConvertConfig
    config = ConvertConfig(type=args.type, method=args.method, calib=args.calib, device=args.device,
                           tensor_types=tuple(args.tensor_type), imatrix=args.imatrix, calib_windows=args.calib_windows,
                           calib_ctx=args.calib_ctx, rotate=args.rotate, rotate_seed=args.rotate_seed,
                           target_size=args.target_size, target_bpw=args.target_bpw, smooth=args.smooth,
                           expert_hadamard=args.expert_hadamard, allow_nonfinite=args.allow_nonfinite,
                           split_max_size=args.split_max_size, split_max_tensors=args.split_max_tensors,
                           refine=args.refine, refine_routing=args.refine_routing,
                           refine_scales=args.refine_scales, expert_group=args.expert_group)
    from moeq2gguf import parallel
    lead = parallel.world(config.device).rank == 0   # under torchrun only rank 0 writes, and speaks
    result = convert(args.model_dir, args.output, config, progress=lead and not args.quiet and not args.json,
                     profile=args.profile or args.verbose or args.json)
    if not lead:
        return
    if args.json:
        import json
        print(json.dumps(result.to_dict(), indent=1))
        return
    if result.profile is not None:
        table = result.profile.table()
        print(table) if args.profile else logging.getLogger("moeq2gguf.profile").info("stages:\n%s", table)
    if result.allocation:
        print(result.allocation.table())
    if result.report and any("recon_error" in t for t in result.report.tensors.values()):
        print(reconstruction_summary(result.report))
    if result.report and result.report.refine:
        print(refine_summary(result.report.refine))
    print(f"wrote {result.output} ({result.n_bytes / 2**20:.1f} MiB, {result.n_tensors} tensors) in "
          f"{result.seconds:.1f} s, peak RSS {result.peak_rss_mib:.0f} MiB")


def refine_summary(per_layer: dict) -> str:
    lines = [f"{'--refine':8} {'output error':>25} {'next routing KL':>23} {'top-k agreement':>17} {'codes moved':>12} "
             f"{'scales moved':>13}"]
    for bid, r in sorted(per_layer.items()):
        lines.append(f"layer {bid:<2} {r['error_before']:11.4e} -> {r['error_after']:10.4e} {r['routing_kl_before']:10.3e} -> "
                     f"{r['routing_kl_after']:9.3e} {r['routing_agreement_before']:7.1%} -> {r['routing_agreement_after']:6.1%} "
                     f"{r['codes_moved'] / r['codes']:11.2%} {r['scales_moved'] / r['scales']:12.2%}")
    return "\n".join(lines)


def reconstruction_summary(report) -> str:
    rows = [(name, t) for name, t in report.tensors.items() if "recon_error" in t]
    better = sum(t["recon_error"] < t["recon_error_rtn"] for _, t in rows)
    lines = [f"{'tensor':36} {'type':6} {'error':>12} {'RTN error':>12} {'ratio':>7}"]
    for name, t in rows:
        ratio = t["recon_error"] / t["recon_error_rtn"] if t["recon_error_rtn"] else float("nan")
        lines.append(f"{name:36} {t['type']:6} {t['recon_error']:12.4e} {t['recon_error_rtn']:12.4e} {ratio:7.3f}")
    lines.append(f"GPTQ below RTN on {better} of {len(rows)} tensors")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> None:
    from moeq2gguf.config import EvalConfig
    from moeq2gguf.eval import evaluate
    config = EvalConfig(text=args.text or args.split, ctx=args.ctx, chunks=args.chunks)
    if args.plot:
        from moeq2gguf.commands.plots import _pyplot, check_path
        check_path(args.plot)
        _pyplot()
    result = evaluate(args.quant, args.base, text=config.text, ctx=config.ctx, chunks=config.chunks,
                      progress=not args.json)
    routing = None
    if args.routing_model:
        from moeq2gguf.eval.routing import routing_agreement
        routing = routing_agreement(args.quant, args.routing_model, text=args.text or args.split, ctx=args.ctx)
    if args.json:
        import json
        payload = json.loads(result.to_json())
        if routing is not None:
            payload["routing_agreement_pct"] = routing
        print(json.dumps(payload, indent=1))
    else:
        print(result.table())
        if routing is not None:
            print("routing agreement (same top-k set), per layer: " + " ".join(f"{a:.1f}%" for a in routing))
    if args.plot:
        from moeq2gguf.commands.plots import eval_plot
        out = eval_plot(result, args.plot, routing)
        if not args.json:
            print(f"wrote {out}")


def _inspect(args: argparse.Namespace) -> None:
    from moeq2gguf.commands.inspect import inspect
    if args.plot:
        from moeq2gguf.commands.plots import _pyplot, check_path
        check_path(args.plot)
        _pyplot()
    result = inspect(args.path, type=args.type)
    print(result.to_json() if args.json else result.table())
    if args.plot:
        from moeq2gguf.commands.plots import recipe_plot
        out = recipe_plot(result, args.plot)
        if not args.json:
            print(f"wrote {out}")


def _diff(args: argparse.Namespace) -> None:
    from moeq2gguf.commands.diff import diff
    result = diff(args.a, args.b)
    print(result.to_json() if args.json else result.table())


def _bench(args: argparse.Namespace) -> None:
    from moeq2gguf.runtime.bench import bench_file, machine_info, table, to_json
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        raise Moeq2ggufError(f"--threads {args.threads!r} is not a comma-separated list of integers; e.g. --threads 1,2,4") from None
    rows = bench_file(args.path, threads=threads, ctx=args.ctx, gen=args.gen, repeats=args.repeats)
    machine = machine_info()
    print(to_json(rows, machine) if args.json else table(rows, machine))


def _runtime_build(args: argparse.Namespace) -> None:
    from moeq2gguf.runtime.build import build, build_stock
    if args.cuda_arch and not args.cuda:
        raise Moeq2ggufError("--cuda-arch applies to --cuda builds; add --cuda")
    if args.stock:
        if args.cuda or args.cmake_arg:
            raise Moeq2ggufError("--stock builds the CPU llama.cpp that llama-cpp-python runs; drop --cuda/--cmake-arg")
        result = build_stock(jobs=args.jobs, force=args.force, say=lambda line: print(f"[llama.cpp] {line}", flush=True))
        how = "cached" if result.cached else f"built in {result.seconds:.0f} s"
        print(f"stock llama.cpp ({how}): {result.lib_dir}")
        return
    result = build(cuda=args.cuda, cuda_arch=args.cuda_arch, jobs=args.jobs, force=args.force,
                   cmake_args=tuple(args.cmake_arg or ()))
    how = "cached" if result.cached else f"built in {result.seconds:.0f} s"
    print(f"patched llama.cpp ({how}): {result.lib_dir}")


def _runtime_check(args: argparse.Namespace) -> None:
    from moeq2gguf.runtime import selfcheck
    from moeq2gguf.runtime.build import cpu_choice
    result = selfcheck.check(args.lib_dir)
    print(f"llama.cpp self-check passed in {result.seconds:.1f} s: {result.output.splitlines()[-1]}")
    if args.verbose_check:
        print(f"this machine: {cpu_choice().summary()}")


def _runtime_cuda_check(args: argparse.Namespace) -> None:
    import time
    from moeq2gguf.runtime.build import cuda_compile_check
    t0 = time.perf_counter()
    results = cuda_compile_check(arch=args.arch, files=args.file or None, jobs=args.jobs, force=args.force)
    for name, seconds in results:
        print(f"{name:<24} {seconds:6.1f} s")
    print(f"compiled {len(results)} patched ggml-cuda files for sm_{args.arch} with nvcc: "
          f"{sum(s for _, s in results):.1f} s of compiles, {time.perf_counter() - t0:.1f} s in all")


def _demo(args: argparse.Namespace) -> None:
    from moeq2gguf.commands.demo import demo
    demo(workdir=args.workdir)


def _calibrate(args: argparse.Namespace) -> None:
    from moeq2gguf.calib import calibrate, format_report
    from moeq2gguf.config import CalibrateConfig
    config = CalibrateConfig(output=args.output, ebss=args.ebss, n=args.n, length=args.len, beams=args.beams,
                             tau=args.tau, topk=args.topk, seed=args.seed, eos_guard=not args.no_eos_guard,
                             ngram_guard=args.ngram_guard, repetition_penalty=args.repetition_penalty,
                             balance=args.balance, report=tuple(args.report), device=args.device, reach=args.reach,
                             imatrix_out=args.imatrix_out, imatrix_weighting=args.imatrix_weighting, calib=args.calib,
                             calib_windows=args.calib_windows, calib_ctx=args.calib_ctx)
    result = calibrate(args.model_dir, config, progress=not args.quiet)
    if result.ebss:
        e = result.ebss
        guards = ", ".join(f"{g} {v['changed']}/{v['of']}" if v["enabled"] else f"{g} off" for g, v in e.guards.items())
        print(f"wrote {e.output}: {e.ids.shape[0]} x {e.ids.shape[1]} tokens in {e.seconds:.1f} s "
              f"({e.tokens_per_s:.0f} tok/s), sigma {e.set_sigma:.4f}, mean log-prob {sum(e.mean_logprob) / len(e.mean_logprob):.3f}; "
              f"steps where a guard changed the kept beams: {guards}")
    if result.imatrix:
        m = result.imatrix
        print(f"wrote {m.output}: {m.entries} weights, {m.weighting}-weighted statistics of {m.windows} x {m.ctx} tokens "
              f"in {m.seconds:.1f} s (llama.cpp GGUF imatrix: llama-quantize --imatrix {m.output} ...)")
    if result.report:
        print(format_report(result.report))
        if args.reach:
            from moeq2gguf.calib.balance import format_reach
            from moeq2gguf.models.registry import open_model
            from moeq2gguf.io.hub import resolve_model
            print(format_reach(result.report, open_model(resolve_model(args.model_dir)).spec.n_experts_used))


def _version() -> str:
    import importlib.metadata
    from moeq2gguf import __version__
    try:
        llama = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        llama = "not installed"
    return f"moeq2gguf {__version__} (llama-cpp-python {llama})"


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for torch, numba and llama.cpp alike (default: the cores this process may use)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeq2gguf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint (folder or Hub id) to GGUF")
    p.add_argument("model_dir", metavar="MODEL", help="a checkpoint folder (config.json, *.safetensors, tokenizer) or a Hugging Face Hub id such as Qwen/Qwen3-30B-A3B[@revision], resolved through the HF cache (downloaded when online)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument("--type", default="F16", help="F32, F16, BF16 or a llama.cpp mix: Q8_0, Q4_0, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, ...")
    from moeq2gguf import methods
    p.add_argument("--method", default="rtn", choices=methods.names(),
                   help="; ".join(f"{n}: {methods.get(n).summary}" for n in methods.names()))
    p.add_argument("--calib", default=None,
                   help="calibration text: a .txt/.jsonl file or folder, ebss (the model samples itself), or a bundled "
                        "source: calib (the stdlib sources' calib split), pydoc-calib (the Python documentation's prose), "
                        "mixed-calib (both). Default: ebss with --device cuda (one process), calib otherwise")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="override a tensor's type, as llama-quantize's --tensor-type (repeatable)")
    p.add_argument("--imatrix", default=None, help="a llama-imatrix GGUF file to use as importance (with --method rtn)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-size", default=None, metavar="SIZE",
                        help="instead of --type: choose each tensor's type so the file fits SIZE (6GiB, 3.5GB, bytes; "
                             "or a mix name such as Q4_K_M: the tensor bytes llama.cpp's Q4_K_M of this model has) with "
                             "the least predicted loss, measured with --method's quantizer on the calibration text")
    target.add_argument("--target-bpw", type=float, default=None, metavar="BPW",
                        help="as --target-size, for bits per weight as llama.cpp prints them")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="fold the norms and rotate the residual stream by a seeded randomized Hadamard (or orthogonal) "
                   "matrix: exact in float, runs on stock llama.cpp, spreads outliers. Default: on for --method moequant "
                   "(except MXFP4 checkpoints), off otherwise")
    p.add_argument("--rotate-seed", type=int, default=None, metavar="N", help="seed of --rotate's matrix (default 0)")
    p.add_argument("--smooth", default=None, metavar="KIND[,KIND]",
                   help="EAQuant smoothing (alpha 0.6) measured on the calibration text, exact in float. aggregate: one "
                        "s per layer folded into the FFN norm and the columns of every FFN reader; down: each expert's "
                        "up rows / s, down columns * s; aggregate,down: both (these run on stock llama.cpp). "
                        "per-expert (experimental: 0.977-1.045x moequant's mean KLD at Q2_K..IQ3_XXS for more bytes, "
                        "0.949-1.031x with --target-size at equal quantized bytes; BENCHMARKS.md): each expert's "
                        "gate/up input by its own s_e; the file then needs the patched llama.cpp (moeq2gguf runtime "
                        "build)")
    p.add_argument("--expert-hadamard", action="store_true",
                   help="experimental (0.975-1.014x moequant's mean KLD at Q2_K..IQ3_XXS for more bytes; with "
                        "--target-size at equal quantized bytes 0.883-1.194x, below 0.9x only at IQ2_M on one model; "
                        "BENCHMARKS.md): "
                        "rotate each expert's down-projection input by a blockwise Hadamard that the patched llama.cpp "
                        "applies at run time (moeq2gguf runtime build)")
    _add_threads(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--split-max-size", default=None, metavar="SIZE",
                   help="split the output into parts of at most SIZE (50G, 2GiB, bytes) as llama.cpp does "
                        "(OUT-00001-of-0000N.gguf; load the first part)")
    p.add_argument("--split-max-tensors", type=int, default=0, metavar="N", help="split into parts of at most N tensors")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="after GPTQ of each layer, tune its K-quant codes for STEPS signed-gradient steps against the float "
                        "layer's output and the next router (gptq/moequant; default 0: off)")
    p.add_argument("--refine-routing", type=float, default=1.0, metavar="W",
                   help="weight of --refine's routing-consistency term (default 1; 0: output error only)")
    p.add_argument("--refine-scales", type=float, default=0.2, metavar="R",
                   help="--refine also moves each 256-weight block's fp16 scale by a factor in [1-R, 1+R] (default 0.2; "
                        "0: codes only)")
    p.add_argument("--expert-group", type=int, default=None, metavar="N",
                   help="quantize each layer's routed experts N at a time (statistics and GPTQ), to bound memory; the "
                        "file is the same (default: all at once when the layer fits the device's free memory, else "
                        "as many as fit)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (file, sizes, types, method, time, memory, coverage, stage profile)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/Inf weights (and F16-overflowing ones) as they are instead of stopping with the "
                        "tensor's name")
    p.add_argument("--profile", action="store_true",
                   help="print seconds and peak memory per stage (read, forward, statistics, scale search, gptq, "
                        "round, pack, write) and per layer (also logged with -v)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="PPL, KLD and same-top-1 of a GGUF against its float GGUF, through llama.cpp")
    p.add_argument("quant", help="the GGUF to judge")
    p.add_argument("--base", required=True, help="the float (F32/BF16/F16) GGUF of the same model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a .txt or .jsonl file, or a folder of them")
    src.add_argument("--split", default="eval", choices=["eval", "calib", "train"], help="a stdlib corpus split (default eval)")
    p.add_argument("--ctx", type=int, default=512, help="window length; the second half of each window is scored")
    p.add_argument("--chunks", type=int, default=None, help="at most this many windows")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--routing-model", default=None, metavar="MODEL_DIR",
                   help="also report per-layer routing agreement against this float checkpoint (torch side)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the per-token KLD distribution (and, with --routing-model, the per-layer routing "
                        "agreement) into this image (needs matplotlib: the plot extra)")
    _add_threads(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("calibrate", help="write EBSS calibration data (the model samples itself, balancing its experts) "
                                         "and/or report the expert balance of calibration sets")
    p.add_argument("model_dir", metavar="MODEL", help="a checkpoint folder (config.json, *.safetensors, tokenizer) or a Hugging Face Hub id such as Qwen/Qwen3-30B-A3B[@revision], resolved through the HF cache (downloaded when online)")
    p.add_argument("--ebss", action="store_true", help="generate expert-balanced self-sampled sequences into -o")
    p.add_argument("-o", "--output", default=None, help="output .jsonl ({\"text\", \"ids\"} per line; usable as convert --calib)")
    p.add_argument("--n", type=int, default=128, help="sequences (default 128)")
    p.add_argument("--len", type=int, default=512, help="tokens per sequence, BOS included (default 512)")
    p.add_argument("--beams", type=int, default=4, help="beams per sequence (default 4)")
    p.add_argument("--tau", type=float, default=None, help="balance temperature: cost = -R/l + sigma/tau; smaller balances harder "
                        "(default: DEFAULT_TAU of moeq2gguf/calib/ebss.py, measured on the bundled models)")
    p.add_argument("--topk", type=int, default=64, help="candidates per beam and step (default 64)")
    p.add_argument("--balance", default="candidate", choices=["parent", "candidate"],
                   help="sigma in the cost: of the parent beam (docs/METHODS.md) or of each candidate, from one extra "
                        "batched pass over all candidates per step (stronger balance, about topk/2 x the compute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eos-guard", action="store_true", help="allow EOS and other special tokens inside sequences")
    p.add_argument("--ngram-guard", type=int, default=4, metavar="N", help="ban repeated N-grams (default 4; 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="penalty on tokens already in the beam (default 1.1; 1: off)")
    p.add_argument("--report", action="append", default=[], metavar="SPLIT|FILE",
                   help="print the expert balance (sigma, min/max expert tokens per layer) of a split or file, next to "
                        "the EBSS data, at equal token count (repeatable)")
    p.add_argument("--reach", action="store_true",
                   help="with --report: per source, the experts it never selects, with the best rank and highest routing "
                        "probability its tokens gave them (an expert no source reaches cannot be calibrated by any text)")
    p.add_argument("--imatrix-out", default=None, metavar="FILE.gguf",
                   help="write per-expert input statistics from the calibration forward as llama.cpp's GGUF imatrix "
                        "(for llama-quantize --imatrix and ik_llama.cpp)")
    p.add_argument("--imatrix-weighting", default="plain", choices=["plain", "affinity"],
                   help="plain (default): llama-imatrix's statistic, per expert; affinity: each token's x^2 weighted by "
                        "its routing weight for that expert")
    p.add_argument("--calib", default=None, help="text for --imatrix-out: a split name, .txt/.jsonl file or folder "
                                                 "(default: the --ebss output when given, else the calib split)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows for --imatrix-out (default 32)")
    p.add_argument("--calib-ctx", type=int, default=512, help="tokens per window for --imatrix-out (default 512)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: the GPU when present")
    _add_threads(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("inspect", help="architecture, experts, tensor types and sizes of a GGUF file, or what "
                                       "convert will write for a checkpoint directory")
    p.add_argument("path", help="a .gguf file or a Hugging Face checkpoint directory")
    p.add_argument("--type", default="F16", help="for a checkpoint: the --type convert would be given (default F16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the bits per weight of every layer x tensor kind (the allocation at a glance) into this "
                        "image (needs matplotlib: the plot extra)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("diff", help="where two GGUF files of one model differ: per tensor types, share of differing "
                                    "bytes and largest dequantized difference; differing metadata")
    p.add_argument("a", help="a .gguf file (the first part of a split file)")
    p.add_argument("b", help="another .gguf file of the same model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_diff)

    p = sub.add_parser("bench", help="load time, peak RSS, prompt and generation tokens/s of any GGUF through "
                                     "llama-cpp-python, each thread count in a fresh process")
    p.add_argument("path", help="a .gguf file")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, one row each (default 1,2)")
    p.add_argument("--ctx", type=int, default=512, help="prompt tokens, decoded in one batch (default 512)")
    p.add_argument("--gen", type=int, default=64, help="greedy tokens generated after the prompt (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per thread count; the median is shown (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON (rows and machine) instead of a table")
    p.set_defaults(func=_bench)

    p = sub.add_parser("runtime", help="the patched llama.cpp that runs --smooth per-expert / --expert-hadamard files")
    rsub = p.add_subparsers(dest="runtime_command", required=True)
    b = rsub.add_parser("build", help="build (or find cached) the patched libllama from the pinned llama-cpp-python sdist, "
                                      "against the installed stock libggml; prints its folder (LLAMA_CPP_LIB_PATH)")
    b.add_argument("--stock", action="store_true",
                   help="instead: build the stock llama.cpp of the same sdist for this CPU and install it into "
                        "llama-cpp-python (what `make setup` does; AMX only after a probe, docs/PLATFORMS.md)")
    b.add_argument("--cuda", action="store_true", help="also build libggml with CUDA (for a llama-cpp-python without it)")
    b.add_argument("--cuda-arch", default=None, metavar="ARCHS", help="CMAKE_CUDA_ARCHITECTURES with --cuda, e.g. 90")
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    b.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    b.add_argument("--cmake-arg", action="append", metavar="-DNAME=VALUE",
                   help="an extra CMake configure option, e.g. -DGGML_CUDA_FA=OFF (repeatable; part of the cache key)")
    b.set_defaults(func=_runtime_build)
    k = rsub.add_parser("check", help="run one quantized matmul through llama-cpp-python in a child process; a "
                                      "library built for instructions this CPU lacks (SIGILL) gets a clear message")
    k.add_argument("--lib-dir", default=None, metavar="DIR",
                   help="check the libraries in DIR (LLAMA_CPP_LIB_PATH) instead of llama-cpp-python's own")
    k.add_argument("--cpu", dest="verbose_check", action="store_true", help="also print this CPU's feature choice")
    k.set_defaults(func=_runtime_check)
    c = rsub.add_parser("cuda-check", help="compile (nvcc -c, no GPU, nothing linked) the ggml-cuda sources that "
                                           "runtime_patches/ change, with a CMake configure's flags; fails on any error")
    c.add_argument("--arch", default="90", help="CUDA architecture, as CMAKE_CUDA_ARCHITECTURES (default 90)")
    c.add_argument("--file", action="append", metavar="NAME",
                   help="a ggml-cuda source to compile instead of the patched ones, e.g. mmid.cu (repeatable)")
    c.add_argument("-j", "--jobs", type=int, default=None, help="parallel nvcc jobs (default: all cores)")
    c.add_argument("--force", action="store_true",
                   help="compile even when the check passed before with the same patches, sources and nvcc")
    c.set_defaults(func=_runtime_cuda_check)

    p = sub.add_parser("demo", help="convert the bundled Qwen2-MoE model, run it in llama.cpp, compare with transformers")
    p.add_argument("--workdir", default=None, help="where to write the GGUF (default: a temporary folder)")
    _add_threads(p)
    p.set_defaults(func=_demo)
    return parser


class Terminated(BaseException):
    """SIGTERM (kill, systemd, container runtimes), raised where the process is, so that cleanup runs as for Ctrl-C."""


_SIGNALLED: list[str] = []   # the signals received, so that an interrupt another library turned into its own error
                             # (safetensors' reader raises ValueError when Ctrl-C lands inside it) still reads as one


def _terminate(signum, frame) -> None:
    _SIGNALLED.append("SIGTERM")
    raise Terminated()


def _interrupt(signum, frame) -> None:
    _SIGNALLED.append("SIGINT")
    raise KeyboardInterrupt()


def _signal_exit(kind: str) -> int:
    if kind == "SIGINT":
        print("moeq2gguf: interrupted (SIGINT); the unfinished output was removed", file=sys.stderr)
        return 130
    print("moeq2gguf: terminated (SIGTERM); the unfinished output was removed", file=sys.stderr)
    return 143


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # an ignored SIGINT stays ignored
            signal.signal(signal.SIGINT, _interrupt)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "threads") and not isinstance(args.threads, str):   # bench's --threads is its list
            from moeq2gguf.threads import set_threads
            set_threads(args.threads)
        args.func(args)
    except Moeq2ggufError as exc:
        print(f"moeq2gguf: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"moeq2gguf: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # the disk full, a file not writable: one line, the partial output already removed
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"moeq2gguf: error: {exc.strerror or exc}{where}; nothing was written, free the space or fix the "
              "permission and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _signal_exit("SIGINT")
    except Terminated:
        return _signal_exit("SIGTERM")
    except Exception:
        if _SIGNALLED:   # the signal surfaced as another library's error; convert removed its output all the same
            return _signal_exit(_SIGNALLED[0])
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
