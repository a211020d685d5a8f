"""llama.cpp's own quantizer, called in-process through llama-cpp-python (the baseline we compare to)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.mixes import MIXES


def llama_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], mix: str, n_threads: int = 0) -> Path:
    """llama_model_quantize(src -> dst) with llama.cpp's own rules for `mix` (no imatrix)."""
    import llama_cpp

    if mix not in MIXES:
        raise Moeq2ggufError(f"type mix {mix} is unknown; choose one of {', '.join(MIXES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].ftype)
    params.nthread = n_threads
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise Moeq2ggufError(f"llama.cpp failed to quantize {src} to {mix} (code {rc})")
    os.replace(tmp, dst)
    return dst


def llama_tool(name: str) -> Path:
    """A llama.cpp tool binary (llama-quantize, llama-imatrix, llama-perplexity) built by tools/build_llama.sh."""
    import shutil
    candidates = [os.environ.get("MOEQ2GGUF_LLAMA_BIN", "")]
    repo = Path(__file__).resolve().parents[1]
    candidates += [str(p) for p in sorted(repo.glob(".cache/llama-cpp-python-*/build/bin"))]
    for folder in candidates:
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise Moeq2ggufError(f"{name} not found; run `make setup` (tools/build_llama.sh builds it) or set MOEQ2GGUF_LLAMA_BIN")
