"""`moeq2gguf bench FILE.gguf`: load time, peak resident memory, prompt and generation tokens/s of
a GGUF file through llama-cpp-python, per thread count.

Any GGUF that llama.cpp loads works, ours or not. Each thread count runs in a fresh process
(moeq2gguf/bench_worker.py), so its peak RSS is that process's own and no allocator state carries
over from one row to the next (the OS page cache does: a warm file loads faster). The prompt is the first --ctx tokens of the eval split
(docs/EVALUATION.md), tokenized by the model's own tokenizer, decoded in one llama_decode; then --gen
greedy tokens continue it one llama_decode each. Timings are medians of --repeats runs after one
warm-up run; llama.cpp settings are llama_cpp.Llama's defaults (mmap, F16 KV cache, flash attention
off) with n_batch = n_ubatch = ctx.

The worker runs llama-cpp-python's own (stock) llama.cpp, or the patched one (runtime_patches/, `moeq2gguf
runtime build`) with patched=True; by default the patched one exactly when the file needs it (--smooth
per-expert, --expert-hadamard). The row says which one ran (`runtime`, from the library the worker bound).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError

WORKER = Path(__file__).resolve().with_name("bench_worker.py")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BenchRow:
    file: str
    file_bytes: int
    architecture: str
    file_type: str | None          # general.file_type as a llama.cpp mix name (Q4_K_M, F16, ...)
    moeq2gguf_type: str | None     # moeq2gguf.type: the --type we were given, on files we wrote
    description: str               # llama_model_desc, e.g. "qwen2moe ?B Q4_K - Medium"
    n_params: int
    threads: int
    ctx: int                       # prompt tokens, decoded in one batch
    gen: int                       # generated tokens, one at a time after the prompt
    repeats: int
    prompt: str                    # "eval split text", or "random token ids" for a model without a tokenizer
    load_s: float                  # llama_model_load_from_file (mmap)
    context_s: float               # llama_init_from_model (KV cache and compute buffers)
    pp_tok_s: float                # median over repeats
    tg_tok_s: float                # median over repeats
    pp_runs: tuple[float, ...]
    tg_runs: tuple[float, ...]
    peak_rss_mib: float            # VmHWM of the worker process
    runtime: str = "stock"         # "stock" or "patched" llama.cpp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def worker_command() -> list[str]:
    """The worker runs as a script (runpy), so the moeq2gguf package (and torch with it) is not imported there."""
    return [sys.executable, "-c", f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')"]


def worker_request(path: str | os.PathLike[str], threads: int, ctx: int, gen: int, repeats: int, text: str) -> str:
    return json.dumps({"path": str(path), "threads": threads, "ctx": ctx, "gen": gen, "repeats": repeats, "text": text})


@functools.lru_cache(maxsize=4)
def prompt_text(ctx: int) -> str:
    """The start of the eval split, enough characters for ctx tokens of any tokenizer (the worker
    repeats it if a small vocabulary needs more)."""
    from moeq2gguf.calib import corpus
    parts, n = [], 0
    for text in corpus.iter_split("eval"):
        parts.append(text)
        n += len(text)
        if n >= 8 * ctx:
            break
    return "\n\n".join(parts)[: 8 * ctx]


def check_gguf(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise Moeq2ggufError(f"{path} does not exist; pass a .gguf file")
    if not path.is_file():
        raise Moeq2ggufError(f"{path} is not a file; pass a .gguf file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise Moeq2ggufError(f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r}); "
                             f"pass a .gguf file")
    return path


def _check_counts(threads: Sequence[int], ctx: int, gen: int, repeats: int) -> None:
    if not threads or any(not isinstance(t, int) or t < 1 for t in threads):
        raise Moeq2ggufError(f"threads {tuple(threads)} must be one or more positive integers, e.g. 1,2,4")
    for name, value in (("ctx", ctx), ("gen", gen), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise Moeq2ggufError(f"{name} {value!r} must be a positive integer")


def _file_type_name(value: str | None) -> str | None:
    if value is None:
        return None
    import gguf
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return value


def worker_env(patched: bool) -> dict[str, str]:
    """Environment of a worker bound to the patched llama.cpp, or to llama-cpp-python's own."""
    if patched:
        from moeq2gguf.runtime.build import patched_env
        return patched_env()
    return {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}


def run_worker(path: Path, threads: int, ctx: int, gen: int, repeats: int, text: str, patched: bool = False) -> dict:
    proc = subprocess.run(worker_command(), input=worker_request(path, threads, ctx, gen, repeats, text),
                          capture_output=True, text=True, env=worker_env(patched))
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = None
    if isinstance(result, dict) and "error" in result:
        raise Moeq2ggufError(result["error"])
    if proc.returncode != 0 or not isinstance(result, dict):
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        raise Moeq2ggufError(f"the benchmark of {path} at {threads} threads stopped with exit code {proc.returncode} "
                             f"({last}); llama.cpp could not run this file")
    from moeq2gguf.runtime.build import STAMP
    if patched != (Path(result["library"]).parent / STAMP).is_file():
        raise Moeq2ggufError(f"the benchmark worker bound {result['library']}, not the {'patched' if patched else 'stock'} "
                             "llama.cpp it was started for")
    return result


def bench_file(path: str | os.PathLike[str], threads: Sequence[int] = (1, 2), ctx: int = 512, gen: int = 64,
               repeats: int = 3, patched: bool | None = None) -> list[BenchRow]:
    """One BenchRow per thread count, each measured in a fresh process. patched: run the patched llama.cpp
    (runtime_patches/) or the stock one; None: the patched one if the file needs it."""
    path = check_gguf(path)
    threads = tuple(threads)
    _check_counts(threads, ctx, gen, repeats)
    if patched is None:
        from moeq2gguf.runtime.llama import patched_features
        try:
            patched = bool(patched_features(path))
        except (ValueError, OSError, KeyError, IndexError):   # unreadable here: llama.cpp's loader says why
            patched = False
    text = prompt_text(ctx)
    rows = []
    for n in threads:
        r = run_worker(path, n, ctx, gen, repeats, text, patched)
        rows.append(BenchRow(
            file=str(path), file_bytes=path.stat().st_size, architecture=r["architecture"] or "?",
            file_type=_file_type_name(r["file_type"]), moeq2gguf_type=r["moeq2gguf_type"], description=r["description"],
            n_params=r["n_params"], threads=n, ctx=ctx, gen=gen, repeats=repeats, prompt=r["prompt"],
            load_s=r["load_s"], context_s=r["context_s"], pp_tok_s=r["pp_tok_s"], tg_tok_s=r["tg_tok_s"],
            pp_runs=tuple(r["pp_runs"]), tg_runs=tuple(r["tg_runs"]), peak_rss_mib=r["peak_rss_bytes"] / 2**20,
            runtime="patched" if patched else "stock"))
    return rows


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "llama_cpp_python": importlib.metadata.version("llama_cpp_python"), "python": platform.python_version(),
            "platform": platform.platform()}


def to_json(rows: Sequence[BenchRow], machine: dict) -> str:
    return json.dumps({"machine": machine, "rows": [r.to_dict() for r in rows]}, indent=1)


def table(rows: Sequence[BenchRow], machine: dict) -> str:
    first = rows[0]
    mix = first.file_type or "?"
    if first.moeq2gguf_type and first.moeq2gguf_type != mix:
        mix += f" (moeq2gguf --type {first.moeq2gguf_type})"
    lines = [f"{Path(first.file).name}: {first.architecture}, {first.file_bytes / 2**20:.1f} MiB, "
             f"{first.n_params / 1e6:.2f} M params, type {mix}",
             f"prompt {first.ctx} tokens ({first.prompt}), then {first.gen} greedy tokens; median of {first.repeats} "
             f"runs; {machine['cpu']}, {machine['usable_cores']} cores, llama-cpp-python {machine['llama_cpp_python']}",
             f"{'threads':>7} {'load s':>8} {'pp tok/s':>10} {'tg tok/s':>10} {'peak RSS MiB':>13}"]
    for r in rows:
        lines.append(f"{r.threads:>7} {r.load_s:>8.3f} {r.pp_tok_s:>10.1f} {r.tg_tok_s:>10.1f} {r.peak_rss_mib:>13.1f}")
    return "\n".join(lines)

