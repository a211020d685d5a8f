"""llama.cpp's own quantizer, called in-process through llama-cpp-python (the baseline we compare to)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.plan.mixes import MIXES


def llama_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], mix: str, n_threads: int = 0) -> Path:
    """llama_model_quantize(src -> dst) with llama.cpp's own rules for `mix` (no imatrix)."""
    import llama_cpp

    if mix not in MIXES:
        raise Moeq2ggufError(f"type mix {mix} is unknown; choose one of {', '.join(MIXES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].ftype)
    from moeq2gguf.threads import threads
    params.nthread = n_threads or threads()
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    from llama_cpp._utils import suppress_stdout_stderr
    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every fallback to stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise Moeq2ggufError(f"llama.cpp failed to quantize {src} to {mix} (code {rc})")
    os.replace(tmp, dst)
    return dst


def llama_tool(name: str) -> Path:
    """A llama.cpp tool binary (llama-quantize, llama-imatrix, llama-perplexity) built by `moeq2gguf runtime build --stock`."""
    import shutil
    from moeq2gguf.runtime.build import stock_build_dir
    candidates = [os.environ.get("MOEQ2GGUF_LLAMA_BIN", ""), str(stock_build_dir() / "bin")]
    for folder in candidates:
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise Moeq2ggufError(f"{name} not found; run `make setup` (`moeq2gguf runtime build --stock` builds it) or set MOEQ2GGUF_LLAMA_BIN")


def run_tool(args: list) -> str:
    import subprocess
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Moeq2ggufError(f"{Path(str(args[0])).name} failed with code {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout + proc.stderr


def llama_perplexity_kld(base: str | os.PathLike[str], quant: str | os.PathLike[str], text_file: str | os.PathLike[str],
                         ctx: int, chunks: int, workdir: str | os.PathLike[str]) -> tuple[float, float]:
    """(PPL of quant, mean KLD(base || quant)) from llama-perplexity --kl-divergence, F32 KV cache and
    flash attention off, as llama-cpp-python runs by default (with llama-perplexity's default flash
    attention the logits differ slightly: measured +1.2% on a mean KLD of 0.0035, 0.06% on PPL).

    llama-perplexity sometimes exits 0 with its output cut short: then the line of the last window
    (running values) is used if it is there, else the run is repeated. A value found nowhere is an
    error, never a zero; a truncated table is never read as the whole."""
    import re
    tool = llama_tool("llama-perplexity")
    kld_file = Path(workdir) / "base.kld"
    # Its results are printed by a logging thread that exit() can kill before it has written them
    # (llama.cpp's common_log is never destroyed): leave that thread a core of its own.
    from moeq2gguf.threads import threads as our_threads
    threads = max(1, our_threads() - 1)
    common = ["-f", text_file, "-c", ctx, "--chunks", chunks, "-t", threads, "-ctk", "f32", "-ctv", "f32",
              "-fa", "off", "--kl-divergence-base", kld_file]
    run_tool([tool, "-m", base, *common])
    for _ in range(5):  # its output is sometimes cut short at exit: run again rather than guess
        log = run_tool([tool, "-m", quant, *common, "--kl-divergence"])
        ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log)
        kld = re.search(r"Mean\s+KLD:\s*([0-9.]+)", log)
        if ppl and kld:
            return float(ppl.group(1)), float(kld.group(1))
        rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+±\s+[0-9.]+\s+-?[0-9.]+\s+±\s+[0-9.]+\s+([0-9.]+)\s+±", log, re.M)
        if rows and int(rows[-1][0]) == chunks:  # running values after the last window
            return float(rows[-1][1]), float(rows[-1][2])
    raise Moeq2ggufError(f"llama-perplexity printed neither its summary nor all {chunks} per-window lines (5 tries)")
