"""The GPU half of issue 9: does the CUDA fusion of the per-expert smoothing (runtime_patches/0003) compute
what the graph-level path (0002) computes, and what does it cost?

Two steps, on two machines:

  python tools/check_cuda_fusion.py prepare DIR
      here (CPU, the project's .venv): converts the bundled models into the files the check runs (moeq2gguf's
      default moequant recipe at Q4_K_M, plain, with --smooth per-expert, and with --expert-hadamard too), their
      logits on the patched CPU llama.cpp, the benchmark prompt, every file's skeleton (metadata and tensor names:
      the templates of --synth) and DIR/manifest.json. Only Qwen2-MoE's files travel whole (PREPARED: the device
      call carries 64 MiB); Mixtral's come as skeletons, for --synth.

  python tools/check_cuda_fusion.py check DIR --out OUT [--jobs N]
      on a machine with an NVIDIA GPU and nvcc: builds the patched llama.cpp with CUDA (runtime_build.build(
      cuda=True): 0001-0003 on the vendored tree of the pinned llama-cpp-python, every layer offloaded), then
      (a) for every smoothed file, logits of 64 tokens with the fusion and with
          GGML_CUDA_DISABLE_EXPERT_SMOOTH_FUSION=1 (0002's graph as built), once one token per llama_decode
          (MMVQ) and once all 64 in one llama_decode (MMQ); the fused run must report fusions
          (GGML_CUDA_EXPERT_SMOOTH_FUSION_LOG=1) and the unfused one none; max|fused - graph| / max|graph|
          and argmax agreement, and the same against the CPU logits from `prepare` (a different activation
          quantizer, q8_K vs q8_1: for information);
      (b) prompt and generation tok/s (moeq2gguf/bench_worker.py, all layers on the GPU) of the plain file and of
          each smoothed file beside it with the fusion and without it, interleaved over --rounds rounds: ratios
          to the plain file, median over rounds.
      OUT/cuda_fusion.json holds everything; the table is printed.
      --synth SHAPE:LAYERS (repeatable) adds files of a real model's shape (Qwen1.5-MoE-A2.7B, Mixtral-8x7B) with
      LAYERS blocks and random weights, written on the GPU machine from the prepared Q4_K_M files of the same
      architecture (tools/synth_moe_gguf.py: a few GiB each, so they never travel): (a) and (b) run on them too,
      (a) without CPU logits. On the bundled models (n_embd 256) a GPU's launch overheads hide the kernels.

The check imports from moeq2gguf only runtime_build and bench (standard library), and for --synth mixes and
formats.ggml_ref (numpy, gguf) through tools/light_import.py, and otherwise llama_cpp and numpy, so that it runs in a
GPU machine's Python that lacks the converter's dependencies; llama_cpp's Python files can come from any installation
(LLAMA_CPP_LIB_PATH binds the libraries built here). tools/gpu_bundle.sh packs what that machine lacks, and
tools/gpu_check.sh runs the check there.

--engine probe runs the logits and the timings through tools/cuda_fusion_probe.cpp (llama.h alone, compiled with g++
against the build) instead of llama-cpp-python, then tries llama-cpp-python as built and with libstdc++ preloaded,
listing the symbols each library defines that libstdc++ defines too, with a debugger's backtrace where it crashes: on the H200 of 2026-12-04 it did (BENCHMARKS.md), so the results there are the probe's. Both engines
offload every layer and run with flash attention off. --lib-dir runs the check on an existing build (the CPU one
too, to try the script without a GPU: then nothing fuses and every smoothed file is reported as failed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_import  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_TOKENS = 64
FUSION_LINE = "fused the expert smoothing of"
DISABLE = "GGML_CUDA_DISABLE_EXPERT_SMOOTH_FUSION"
LOG = "GGML_CUDA_EXPERT_SMOOTH_FUSION_LOG"
GPU_LAYERS, VERBOSE = "CHECK_CUDA_FUSION_GPU_LAYERS", "CHECK_CUDA_FUSION_VERBOSE"   # for the smoke test


# ---------------------------------------------------------------- prepare (CPU, full package)

PREPARED = [
    # (name, model, type, convert options, travels: the whole file goes to the GPU machine, else its skeleton only,
    # the template of --synth; the device call carries 64 MiB with the tracked tree, whose fixtures take 35)
    ("qwen2moe-tiny-Q4_K_M", "qwen2moe-tiny", "Q4_K_M", {}, True),
    ("qwen2moe-tiny-Q4_K_M-smooth", "qwen2moe-tiny", "Q4_K_M", {"smooth": "per-expert"}, True),
    ("qwen2moe-tiny-Q4_K_M-smooth-ehad", "qwen2moe-tiny", "Q4_K_M", {"smooth": "per-expert", "expert_hadamard": True},
     True),
    ("mixtral-tiny-Q4_K_M", "mixtral-tiny", "Q4_K_M", {}, False),
    ("mixtral-tiny-Q4_K_M-smooth", "mixtral-tiny", "Q4_K_M", {"smooth": "per-expert"}, False),
    ("mixtral-tiny-Q4_K_M-smooth-ehad", "mixtral-tiny", "Q4_K_M", {"smooth": "per-expert", "expert_hadamard": True},
     False),
]


def prepare(out_dir: Path) -> None:
    """Converts every PREPARED file (cached in .cache/check_cuda_fusion), copies those that travel into out_dir with
    their CPU logits (float16), writes every file's skeleton into out_dir/templates, and out_dir/manifest.json."""
    sys.path.insert(0, str(REPO))
    from moeq2gguf import convert, runtime
    from moeq2gguf.runtime.bench import prompt_text
    import synth_moe_gguf
    fixtures = REPO / "moeq2gguf" / "fixtures"
    cache = REPO / ".cache" / "check_cuda_fusion"
    cache.mkdir(parents=True, exist_ok=True)
    (out_dir / "templates").mkdir(parents=True, exist_ok=True)
    (out_dir / "prompt.txt").write_text(prompt_text(512))
    files = []
    for name, model, type_name, options, travels in PREPARED:
        converted = cache / f"{name}.gguf"
        if not converted.is_file():
            convert(fixtures / model, converted, type_name, method="moequant", progress=False, **options)
        patched = bool(runtime.patched_features(converted))
        tokens = np.random.default_rng(0).integers(3, 2000, N_TOKENS).tolist()
        entry = {"name": name, "file": None, "model": model, "type": type_name, "options": options,
                 "patched": patched, "tokens": tokens, "cpu_logits": None,
                 "template": str(synth_moe_gguf.skeleton(converted, out_dir / "templates" / f"{name}.gguf")
                                 .relative_to(out_dir)),
                 "plain": f"{model}-{type_name}" if options.get("smooth") == "per-expert" else None}
        if travels:
            shutil.copyfile(converted, out_dir / converted.name)
            cpu = runtime.run_logits(converted, tokens, patched=patched, n_ctx=128)
            np.save(out_dir / f"{name}.cpu.npy", cpu.astype(np.float16))
            entry.update(file=converted.name, cpu_logits=f"{name}.cpu.npy")
        files.append(entry)
        print(f"{name}: {converted.stat().st_size / 2**20:.1f} MiB, needs the patch: {patched}, "
              f"{'travels' if travels else 'skeleton only'}")
    (out_dir / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


# ---------------------------------------------------------------- check (GPU machine)

def find_cublas() -> tuple[list[str], list[str]]:
    """CMake options and library folders for cuBLAS: the CUDA toolkit's when it has one, else the nvidia-cublas
    wheel's of this Python (a GPU image with PyTorch has it), whose libraries have no unversioned name."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    root = Path(nvcc).resolve().parents[1]
    for lib in (root / "lib64", root / "targets" / "x86_64-linux" / "lib"):
        if (lib / "libcublas.so").exists():
            return [f"-DCMAKE_CUDA_COMPILER={nvcc}"], []
    import site
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13", "nvidia/cublas", "nvidia/cu12"):
            lib, inc = Path(base) / sub / "lib", Path(base) / sub / "include"
            blas = sorted(lib.glob("libcublas.so*"))
            blas_lt = sorted(lib.glob("libcublasLt.so*"))
            if blas and blas_lt and (inc / "cublas_v2.h").is_file():
                return ([f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_cublas_LIBRARY={blas[0]}",
                         f"-DCUDA_cublasLt_LIBRARY={blas_lt[0]}", f"-DCMAKE_CUDA_FLAGS=-I{inc}",
                         f"-DCMAKE_CXX_FLAGS=-I{inc}"], [str(lib)])
    raise SystemExit(f"no cuBLAS: neither the CUDA toolkit at {root} nor an nvidia-cublas wheel of {sys.executable}")


def _env(lib_dir: Path, extra_lib: list[str], fused: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib_dir), *extra_lib, env.get("LD_LIBRARY_PATH", "")])
    env[LOG] = "1"
    env["PYTHONFAULTHANDLER"] = "1"   # a Python child that crashes in llama.cpp says where
    env.pop(DISABLE, None)
    if not fused:
        env[DISABLE] = "1"
    return env


def logits_worker(path: str, tokens_file: str, out_file: str, batch: int) -> None:
    """Run in a child process: logits of every position, `batch` tokens per llama_decode, all layers on the GPU,
    F32 KV cache (as runtime.load), flash attention off."""
    import llama_cpp
    tokens = np.load(tokens_file).tolist()
    llm = llama_cpp.Llama(model_path=path, n_gpu_layers=int(os.environ.get(GPU_LAYERS, "-1")), n_ctx=128,
                          n_batch=batch, n_ubatch=batch, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=bool(os.environ.get(VERBOSE)))
    llm.eval(tokens)
    np.save(out_file, np.array(llm.scores[: len(tokens)], dtype=np.float32))
    print(json.dumps({"gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                      "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}))
    llm.close()


# the C++ probe (tools/cuda_fusion_probe.cpp) when the check runs without llama-cpp-python (see smoke())
PROBE: Path | None = None
ENGINE = "auto"   # --engine: auto (llama-cpp-python, else the probe), or probe


def compile_probe(src: Path, lib_dir: Path, out: Path) -> Path:
    """tools/cuda_fusion_probe.cpp against the libllama just built (g++, llama.h of the patched tree)."""
    cmd = ["g++", "-O2", "-std=c++17", str(REPO / "tools" / "cuda_fusion_probe.cpp"), "-I", str(src / "include"),
           "-I", str(src / "ggml" / "include"), "-L", str(lib_dir), "-lllama", "-lggml", "-lggml-base",
           f"-Wl,-rpath,{lib_dir}", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the probe failed: {proc.stderr[-3000:]}")
    return out


def run_child(cmd: list[str], what: str, env: dict[str, str], timeout: int, stdin: str | None = None) -> dict:
    """Run a worker (the probe, the logits worker, bench_worker): its last stdout line as JSON, with "fusions",
    the fusion log lines on its stderr; RuntimeError with its exit code and output tails when it fails."""
    proc = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}: {proc.stdout[-1000:]} "
                           f"{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["fusions"] = sum(FUSION_LINE in line for line in proc.stderr.splitlines())
    return result


def run_logits(path: Path, tokens: list[int], batch: int, env: dict[str, str], tmp: Path) -> dict:
    what = f"logits of {path.name} (batch {batch})"
    if PROBE is not None:
        np.asarray(tokens, dtype=np.int32).tofile(tmp / "tokens.i32")
        out = tmp / "logits.f32"
        out.unlink(missing_ok=True)
        info = run_child([str(PROBE), str(path), "logits", str(tmp / "tokens.i32"), str(batch),
                          env.get(GPU_LAYERS, "99"), str(out)], "probe " + what, env, 300)
        return {**info, "gpu_offload": env.get(GPU_LAYERS, "99") != "0", "system_info": "C++ probe (llama.h)",
                "logits": np.fromfile(out, dtype=np.float32).reshape(len(tokens), -1)}
    np.save(tmp / "tokens.npy", np.asarray(tokens, dtype=np.int64))
    out = tmp / "logits.npy"
    out.unlink(missing_ok=True)
    info = run_child([sys.executable, __file__, "_logits", str(path), str(tmp / "tokens.npy"), str(out), str(batch)],
                     what, env, 300)
    return {**info, "logits": np.load(out)}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_rel": float(np.abs(a - b).max() / np.abs(b).max()), "identical": bool(np.array_equal(a, b)),
            "same_argmax": int((a.argmax(-1) == b.argmax(-1)).sum()), "n": int(len(a))}


def run_bench(path: Path, env: dict[str, str], ctx: int, gen: int, repeats: int, text: str) -> dict:
    if PROBE is not None:
        result = run_child([str(PROBE), str(path), "bench", str(ctx), str(gen), str(repeats), "99"],
                           f"probe bench of {path.name}", env, 600)
        return {**result, "prompt": "deterministic token ids"}
    bench = light_import.module("runtime.bench")   # moeq2gguf bench's own worker and request
    return run_child(bench.worker_command(), f"bench of {path.name}", env, 600,
                     stdin=bench.worker_request(path, os.cpu_count() or 1, ctx, gen, repeats, text))


def _logits_row(f: dict, path: Path, cpu: np.ndarray | None, batch: int, path_name: str, fused_env: dict[str, str],
                graph_env: dict[str, str], tmp: Path, failures: list[str], plain: Path | None = None) -> dict:
    """cpu: the CPU logits of `prepare`, None for a synthetic file (random weights: only fused vs graph counts).
    plain: the unsmoothed file whose logits a synthetic, exactly smoothed file should reproduce (reported)."""
    fused = run_logits(path, f["tokens"], batch, fused_env, tmp)
    row = {"file": f["name"], "batch": batch, "kernel": path_name, "fusions": fused["fusions"],
           "gpu_offload": fused["gpu_offload"]}
    if cpu is not None:
        row["vs_cpu"] = compare(fused["logits"], cpu)
    if f["patched"] and f["options"].get("smooth") == "per-expert":
        graph = run_logits(path, f["tokens"], batch, graph_env, tmp)
        row["graph_fusions"] = graph["fusions"]
        row["fused_vs_graph"] = compare(fused["logits"], graph["logits"])
        ok = (row["fused_vs_graph"]["max_rel"] <= 1e-3 and row["fused_vs_graph"]["same_argmax"] == N_TOKENS
              and fused["fusions"] > 0 and graph["fusions"] == 0)
        row["ok"] = ok
        if not ok:
            failures.append(f"{f['name']} batch {batch}")
    if plain is not None:
        row["vs_plain"] = compare(fused["logits"], run_logits(plain, f["tokens"], batch, fused_env, tmp)["logits"])
    fv, pv = row.get("fused_vs_graph"), row.get("vs_plain")
    print(f"{f['name']:<34} batch {batch:>2} ({path_name:<4}) fusions {row['fusions']:>4}"
          + (f" | graph fusions {row['graph_fusions']}, fused vs graph max rel {fv['max_rel']:.2e} "
             f"identical {fv['identical']} argmax {fv['same_argmax']}/{fv['n']}" if fv else "")
          + (f" | vs plain file max rel {pv['max_rel']:.2e} identical {pv['identical']} argmax {pv['same_argmax']}/"
             f"{pv['n']}" if pv else "")
          + (f" | vs CPU max rel {row['vs_cpu']['max_rel']:.2e} argmax {row['vs_cpu']['same_argmax']}/"
             f"{row['vs_cpu']['n']}" if cpu is not None else ""), flush=True)
    row["system_info"] = fused["system_info"]
    return row


def backtrace(cmd: list[str], env: dict[str, str]) -> str:
    """The C stack of a crashing command, from cuda-gdb (a GPU image has it; it debugs host code too)."""
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb is None:
        return "no debugger"
    try:
        proc = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 30", "--args", *cmd], env=env,
                              capture_output=True, text=True, timeout=90)
    except subprocess.SubprocessError as exc:
        return f"debugger: {exc}"
    lines = proc.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if "SIGSEGV" in ln or "signal" in ln.lower()), max(0, len(lines) - 60))
    return "\n".join(lines[start:start + 60])


def python_backtrace(path: Path, tokens: list[int], env: dict[str, str], tmp: Path) -> str:
    """backtrace() of this script's llama-cpp-python logits worker on path."""
    np.save(tmp / "tokens.npy", np.asarray(tokens, dtype=np.int64))
    return backtrace([sys.executable, __file__, "_logits", str(path), str(tmp / "tokens.npy"), str(tmp / "bt.npy"),
                      str(N_TOKENS)], env)


def smoke(path: Path, tokens: list[int], env: dict[str, str], tmp: Path, report: dict,
          probe: Path | None = None) -> dict[str, str] | None:
    """One file, verbose, in a few set-ups: the first that runs on the GPU is used for the check (reported), and
    each failure's output is printed, so that one call to a GPU machine says what went wrong. "probe": the C++
    probe instead of llama-cpp-python (tried when the bindings crash; then a debugger's backtrace of the crash)."""
    global PROBE
    variants = [{}, {"probe": "1"}, {"probe": "1", "GGML_CUDA_DISABLE_GRAPHS": "1"}, {"probe": "1", GPU_LAYERS: "0"}]
    report["smoke"] = []
    chosen = None
    for extra in variants:
        if ("probe" in extra and probe is None) or ("probe" not in extra and ENGINE == "probe"):
            continue
        PROBE = probe if "probe" in extra else None
        run_env = {**env, VERBOSE: "1", "PROBE_VERBOSE": "1", **{k: v for k, v in extra.items() if k != "probe"}}
        try:
            info = run_logits(path, tokens, N_TOKENS, run_env, tmp)
            report["smoke"].append({"env": extra, "ok": True})
            print(f"smoke {extra}: ran; system info: {info['system_info']}", flush=True)
            if chosen is None and GPU_LAYERS not in extra:
                chosen = extra
                break
        except (RuntimeError, subprocess.SubprocessError) as exc:
            report["smoke"].append({"env": extra, "ok": False, "error": str(exc)[-3000:]})
            print(f"smoke {extra}: FAILED\n{str(exc)[-2500:]}", flush=True)
            if extra in ({}, {"probe": "1"}):
                if extra:
                    np.asarray(tokens, dtype=np.int32).tofile(tmp / "tokens.i32")
                    bt = backtrace([str(probe), str(path), "logits", str(tmp / "tokens.i32"), str(N_TOKENS), "99",
                                    str(tmp / "bt.f32")], run_env)
                else:
                    bt = python_backtrace(path, tokens, run_env, tmp)
                report["smoke"][-1]["backtrace"] = bt
                print(f"backtrace ({'probe' if extra else 'python'}):\n{bt}", flush=True)
    PROBE = probe if chosen is not None and "probe" in chosen else None
    if chosen is None:
        lib = Path(env["LLAMA_CPP_LIB_PATH"])
        for so in sorted(lib.glob("lib*.so")):
            ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, env=env).stdout
            print(f"ldd {so.name}: " + " | ".join(ln.strip() for ln in ldd.splitlines() if "not found" in ln or
                                                  "cuda" in ln or "cublas" in ln), flush=True)
        print("no set-up runs the GPU; stopping", flush=True)
    elif chosen:
        print(f"the check runs with {chosen}", flush=True)
    report["workaround"] = chosen
    return chosen


# real-size shapes (tools/synth_moe_gguf.py) and the bundled model whose prepared files are their templates
SYNTH_TEMPLATES = {"qwen1.5-moe-a2.7b": "qwen2moe-tiny", "mixtral-8x7b": "mixtral-tiny"}


def synthesize(entries: list[dict], specs: list[str], synth_dir: Path, lib_dir: Path, report: dict) -> list[dict]:
    """For each SHAPE:LAYERS spec, the prepared Q4_K_M files of its template model (plain, smoothed, ...) rewritten at
    that shape with random weights from their skeletons (tools/synth_moe_gguf.py, the same data in every file), as
    manifest entries."""
    import synth_moe_gguf
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)   # ggml's quantizer for the pools: this build's libggml-base
    synth_dir.mkdir(parents=True, exist_ok=True)
    out, report["synth"] = [], []
    for spec in specs:
        shape_name = spec.partition(":")[0]
        shape = synth_moe_gguf.parse_shape(spec)
        label = f"{shape_name}x{shape.n_layer}"
        renamed = {f["name"]: f["name"].replace(SYNTH_TEMPLATES[shape_name], label) for f in entries
                   if f["model"] == SYNTH_TEMPLATES[shape_name] and f["type"] == "Q4_K_M"}
        for f in entries:
            if f["name"] not in renamed:
                continue
            path = synth_dir / f"{renamed[f['name']]}.gguf"
            t0 = time.time()
            info = synth_moe_gguf.synth(Path(f["template"]), path, shape, "Q4_K_M")
            report["synth"].append({**info, "seconds": round(time.time() - t0, 1), "template": f["name"]})
            print(f"synthesized {path.name}: {info['bytes'] / 2**30:.2f} GiB, {info['tensors']} tensors "
                  f"({', '.join(info['types'])}) in {time.time() - t0:.0f} s", flush=True)
            out.append({**f, "name": renamed[f["name"]], "model": label, "path": str(path), "cpu_logits": None,
                        "plain": renamed.get(f["plain"]) if f.get("plain") else None, "synthetic": True})
    return out


def _speed_group(report: dict, failures: list[str], plain: dict, smoothed: list[dict], fused_env: dict[str, str],
                 graph_env: dict[str, str], rounds: int, repeats: int, ctx: int, gen: int, text: str) -> None:
    """Prompt and generation tok/s of a plain file and of each smoothed file beside it, fused and graph-level, all
    interleaved: every round runs every configuration once, in an order rotated by one per round. A row per smoothed
    file; its ratios are medians over rounds of the round's median over the plain file's median of that round."""
    configs = [("plain", Path(plain["path"]), fused_env)]
    for f in smoothed:
        configs += [(f"{f['name']} fused", Path(f["path"]), fused_env), (f"{f['name']} graph", Path(f["path"]), graph_env)]
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    try:
        for r in range(rounds):
            for label, path, env in configs[r % len(configs):] + configs[: r % len(configs)]:
                runs[label].append(run_bench(path, env, ctx, gen, repeats, text))
    except (RuntimeError, subprocess.SubprocessError) as exc:
        report["speed"].append({"plain": plain["name"], "error": str(exc)})
        failures.append(f"speed beside {plain['name']}: {exc}")
        print(f"{plain['name']:<34} speed ERROR {exc}", flush=True)
        return

    def summary(label: str) -> dict:
        return {"pp_tok_s": statistics.median(x for m in runs[label] for x in m["pp_runs"]),
                "tg_tok_s": statistics.median(x for m in runs[label] for x in m["tg_runs"]),
                "fusions": sum(m["fusions"] for m in runs[label])}

    def ratios(label: str, key: str) -> list[float]:
        return [statistics.median(runs[label][i][f"{key}_runs"]) / statistics.median(runs["plain"][i][f"{key}_runs"])
                for i in range(rounds)]

    for f in smoothed:
        row = {"plain": plain["name"], "smooth": f["name"], "ctx": ctx, "gen": gen, "rounds": rounds,
               "repeats": repeats, "plain tok/s": summary("plain")}
        for path_name in ("fused", "graph"):
            label = f"{f['name']} {path_name}"
            row[f"smooth {path_name}"] = summary(label)
            for key in ("pp", "tg"):
                r = ratios(label, key)
                row[f"smooth {path_name} {key} ratio"] = statistics.median(r)
                row[f"smooth {path_name} {key} ratio range"] = [min(r), max(r)]
        report["speed"].append(row)
        print(f"{f['name']:<34} pp{ctx} plain {row['plain tok/s']['pp_tok_s']:9.0f} tok/s, fused x"
              f"{row['smooth fused pp ratio']:.3f} [{row['smooth fused pp ratio range'][0]:.2f}-"
              f"{row['smooth fused pp ratio range'][1]:.2f}], graph x{row['smooth graph pp ratio']:.3f} | tg{gen} plain "
              f"{row['plain tok/s']['tg_tok_s']:7.0f} tok/s, fused x{row['smooth fused tg ratio']:.3f}, graph x"
              f"{row['smooth graph tg ratio']:.3f} | fusions seen: fused {row['smooth fused']['fusions']}, graph "
              f"{row['smooth graph']['fusions']}", flush=True)


def python_diagnosis(path: Path, tokens: list[int], env: dict[str, str], lib_dir: Path, tmp: Path) -> dict:
    """Does llama-cpp-python run this build: as is, then with the system's libstdc++ preloaded (so that its
    definitions come first, as in the C++ probe, which links it). Where it crashes, a debugger's backtrace; and, for
    each library of the build, the dynamic symbols it defines that libstdc++.so.6 defines too (the crash of
    2026-12-04 ended in std::ostream::_M_insert<long> bound from libggml-cuda; on the CPU build only libllama has
    any: 6 inline instantiations such as std::ctype<char>::do_widen)."""
    libstdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()

    def defined(so: str) -> set[str]:
        out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True).stdout
        return {ln.split()[-1].split("@")[0] for ln in out.splitlines() if ln.strip()}

    runtime_symbols = defined(libstdcxx)
    result: dict = {"libstdc++": libstdcxx, "also_in_libstdc++": {}}
    for so in sorted(lib_dir.glob("lib*.so")):
        both = sorted(defined(str(so)) & runtime_symbols)
        names = subprocess.run(["c++filt"], input="\n".join(both[:8]), capture_output=True, text=True).stdout.split("\n")
        result["also_in_libstdc++"][so.name] = {"count": len(both), "examples": [n for n in names if n]}
    print("symbols each library defines that libstdc++ defines too: " + ", ".join(
        f"{k} {v['count']}" for k, v in result["also_in_libstdc++"].items()), flush=True)
    for label, extra in (("as built", {}), ("LD_PRELOAD libstdc++", {"LD_PRELOAD": libstdcxx})):
        try:
            run_logits(path, tokens, N_TOKENS, {**env, **extra}, tmp)
            result[label] = "llama-cpp-python ran the file"
            print(f"llama-cpp-python, {label}: ran the file", flush=True)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            bt = python_backtrace(path, tokens, {**env, **extra}, tmp)
            result[label] = {"error": str(exc)[-3000:], "backtrace": bt}
            print(f"llama-cpp-python, {label}: {str(exc)[-1500:]}\nbacktrace:\n{bt}", flush=True)
    return result


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check(files_dir: Path, out_dir: Path, jobs: int | None, rounds: int, repeats: int, ctx: int, gen: int,
          cmake_args: list[str], lib_dir: Path | None = None, synth_specs: list[str] = (),
          synth_dir: Path = Path("/tmp/moeq2gguf-synth"), speed: str = "all", python_check: bool = True) -> int:
    """Everything that ran is written to OUT/cuda_fusion.json, after each step and also when a step fails or a
    `timeout` stops the check (SIGTERM ends it through the same path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _check(report, files_dir, out_dir, jobs, rounds, repeats, ctx, gen, cmake_args, lib_dir, list(synth_specs),
                      synth_dir, speed, python_check)
    finally:
        save_report(report, out_dir)


def save_report(report: dict, out_dir: Path) -> None:
    (out_dir / "cuda_fusion.json").write_text(json.dumps(report, indent=1))


def _check(report: dict, files_dir: Path, out_dir: Path, jobs: int | None, rounds: int, repeats: int, ctx: int,
           gen: int, cmake_args: list[str], lib_dir: Path | None, synth_specs: list[str], synth_dir: Path, speed: str,
           python_check: bool) -> int:
    global PROBE
    report["machine"] = {"gpu": gpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                                "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True,
                                                       text=True).stdout.strip().splitlines()[-1:]}
    print("machine:", report["machine"], flush=True)
    if lib_dir is None:
        blas_args, extra_lib = find_cublas()
        args = tuple(blas_args + cmake_args)
        built = light_import.module("runtime.build").build(cuda=True, cuda_arch="90", jobs=jobs, cmake_args=args)
        lib_dir = built.lib_dir
        report["build"] = {"seconds": round(built.seconds, 1), "cached": built.cached,
                           "cmake_args": list(args), "lib_dir": str(lib_dir)}
        print(f"patched llama.cpp with CUDA built in {report['build']['seconds']} s: {lib_dir}", flush=True)
    else:   # a build made earlier (or the CPU one, to try this script without a GPU)
        extra_lib = []

    manifest = json.loads((files_dir / "manifest.json").read_text())
    entries = [{**f, "template": str(files_dir / f["template"])} for f in manifest["files"]]
    files = [{**f, "path": str(files_dir / f["file"])} for f in entries if f.get("file")]
    tmp = out_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    fused_env, graph_env = _env(lib_dir, extra_lib, True), _env(lib_dir, extra_lib, False)
    try:
        src = light_import.module("runtime.build").build_dir(True) / "src"
        probe = compile_probe(src, lib_dir, tmp / "cuda_fusion_probe")
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"no C++ probe: {exc}", flush=True)
        probe = None
    workaround = smoke(Path(files[0]["path"]), files[0]["tokens"], fused_env, tmp, report, probe)
    if workaround is None:
        return 2
    workaround = {k: v for k, v in workaround.items() if k != "probe"}
    report["engine"] = "C++ probe" if PROBE is not None else "llama-cpp-python"
    print(f"engine: {report['engine']}", flush=True)
    fused_env.update(workaround)
    graph_env.update(workaround)
    if synth_specs:
        files += synthesize(entries, synth_specs, synth_dir, lib_dir, report)
        save_report(report, out_dir)
    by_name = {f["name"]: f for f in files}
    failures: list[str] = []
    report["logits"] = []
    for f in files:
        path = Path(f["path"])
        cpu = np.load(files_dir / f["cpu_logits"]).astype(np.float32) if f.get("cpu_logits") else None
        if cpu is None and not f["patched"]:
            continue   # a synthetic plain file: nothing to compare its logits with (its speed is measured below)
        # a synthetic file smoothed exactly (tools/synth_moe_gguf.py) computes its plain file's logits
        plain = (Path(by_name[f["plain"]]["path"]) if f.get("synthetic") and f.get("plain") in by_name
                 and not f["options"].get("expert_hadamard") else None)
        for batch, path_name in ((1, "MMVQ"), (N_TOKENS, "MMQ")):
            try:
                row = _logits_row(f, path, cpu, batch, path_name, fused_env, graph_env, tmp, failures, plain)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                row = {"file": f["name"], "batch": batch, "error": str(exc)}
                failures.append(f"{f['name']} batch {batch}: {exc}")
                print(f"{f['name']:<34} batch {batch:>2} ERROR {exc}", flush=True)
            report["logits"].append(row)
            report["system_info"] = row.pop("system_info", report.get("system_info"))
            save_report(report, out_dir)

    text = (files_dir / "prompt.txt").read_text()
    report["speed"] = []
    # the synthetic files first: they are what the device time is for when a time limit cuts the check short
    plains = sorted(dict.fromkeys(f["plain"] for f in files if f.get("plain") in by_name),
                    key=lambda name: by_name[name].get("cpu_logits") is not None)
    if speed == "synth":
        plains = [name for name in plains if by_name[name].get("synthetic")]
    for plain_name in plains:
        _speed_group(report, failures, by_name[plain_name], [f for f in files if f.get("plain") == plain_name],
                     fused_env, graph_env, rounds, repeats, ctx, gen, text)
        save_report(report, out_dir)
    report["failures"] = failures
    if ENGINE == "probe" and python_check:   # after the results: does llama-cpp-python run this build, if not, why
        PROBE = None
        report["python"] = python_diagnosis(Path(files[0]["path"]), files[0]["tokens"], {**fused_env, VERBOSE: "1"},
                                            lib_dir, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    print("FAILED: " + ", ".join(failures) if failures else "fused == graph within 1e-3 with identical argmax on "
          "every smoothed file and batch, and the fused runs fused")
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_logits":
        logits_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    c = sub.add_parser("check")
    c.add_argument("dir", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--jobs", type=int, default=None)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--gen", type=int, default=64)
    c.add_argument("--engine", choices=["auto", "probe"], default="auto",
                   help="auto: llama-cpp-python, the C++ probe if that crashes; probe: the probe only")
    c.add_argument("--lib-dir", type=Path, default=None,
                   help="use this patched llama.cpp build instead of building (e.g. .cache/llama-patched/lib on a CPU)")
    c.add_argument("--synth", action="append", default=[], metavar="SHAPE:LAYERS",
                   help="also check and time random-weight files of a real model's shape, written to --synth-dir from "
                        "the prepared Q4_K_M files of the same architecture (tools/synth_moe_gguf.py), e.g. "
                        "qwen1.5-moe-a2.7b:8 or mixtral-8x7b:4")
    c.add_argument("--synth-dir", type=Path, default=Path("/tmp/moeq2gguf-synth"),
                   help="where the synthetic files go (GiB each: not under --out, whose files come back)")
    c.add_argument("--cmake-arg", action="append", default=[],
                   help="extra configure option for the CUDA build, e.g. -DGGML_CUDA_FA=OFF")
    c.add_argument("--speed", choices=["all", "synth"], default="all",
                   help="time every group of files, or only the synthetic (real-size) ones")
    c.add_argument("--no-python-check", action="store_true",
                   help="skip the llama-cpp-python diagnosis after the results (the probe is used either way)")
    args = parser.parse_args()
    global ENGINE
    if args.command == "check":
        ENGINE = args.engine
    if args.command == "prepare":
        prepare(args.dir)
        return 0
    return check(args.dir, args.out, args.jobs, args.rounds, args.repeats, args.ctx, args.gen, args.cmake_arg,
                 args.lib_dir, args.synth, args.synth_dir, args.speed, not args.no_python_check)


if __name__ == "__main__":
    sys.exit(main())
