"""llama-cpp-python as the runtime the project targets: load a GGUF, tokenize, get logits.

A file converted with --smooth per-expert or --expert-hadamard needs the patched llama.cpp
(runtime_patches/, built by `moeq2gguf runtime build`). llama-cpp-python binds its library once per
process, at import (LLAMA_CPP_LIB_PATH): load(..., patched=True) binds the patched one when llama_cpp is
not imported yet, and run_logits(..., patched=True) works from any process by starting a new one.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.threads import threads

# GGUF keys (suffix after "<arch>.") of the features only the patched llama.cpp runs
PATCHED_FEATURES = {"expert_smoothing": "per-expert input smoothing (blk.N.ffn_exps_smooth)",
                    "expert_hadamard_block": "the expert Hadamard (ffn_exps_hadamard)"}


def patched_features(path: str | os.PathLike[str]) -> list[str]:
    """What in this GGUF file only the patched llama.cpp runs (empty for a stock file)."""
    import gguf
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    found = []
    for key, what in PATCHED_FEATURES.items():
        field = fields.get(f"{arch}.{key}")
        if field is not None and field.contents():
            found.append(what)
    return found


def bound_library() -> Path | None:
    """The libllama this process's llama-cpp-python is bound to (None before llama_cpp is imported)."""
    module = sys.modules.get("llama_cpp.llama_cpp")
    if module is None:
        return None
    return Path(module._lib._name)


def is_patched() -> bool | None:
    """Whether this process runs the patched llama.cpp (None: llama_cpp not imported yet)."""
    from moeq2gguf.runtime.build import STAMP
    lib = bound_library()
    return None if lib is None else (lib.parent / STAMP).is_file()


def bind(patched: bool) -> None:
    """Import llama_cpp against the stock or the patched library, or check the one already bound."""
    from moeq2gguf.runtime.build import cached_lib_dir
    state = is_patched()
    if state is None and patched:
        lib_dir = cached_lib_dir()
        if lib_dir is None:
            raise Moeq2ggufError("the patched llama.cpp is not built; run `moeq2gguf runtime build` first")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    import llama_cpp  # noqa: F401  (binds the library)
    if patched and not is_patched():
        raise Moeq2ggufError(f"this process's llama-cpp-python is bound to {bound_library()}, the stock llama.cpp; "
                             "the library is chosen at import: load(..., patched=True) before any other llama_cpp use, "
                             "start the process with moeq2gguf.runtime.build.patched_env(), or use "
                             "runtime.run_logits(..., patched=True)")


@contextlib.contextmanager
def load(path: str | os.PathLike[str], n_ctx: int = 512, f32_kv_cache: bool = True,
         n_threads: int | None = None, patched: bool = False, verbose: bool = False) -> Iterator["object"]:
    """A llama_cpp.Llama with logits for every position. An F32 KV cache by default, so that a
    comparison with transformers is about the weights, not the cache's fp16 rounding (router
    near-ties flip at ~1e-3). patched: run the patched llama.cpp (runtime_patches/); verbose: llama.cpp's
    log on stderr (it says why a file does not load)."""
    path = Path(path)
    if not path.is_file():
        raise Moeq2ggufError(f"{path} does not exist; pass a .gguf file")
    bind(patched)
    needs = patched_features(path)
    if needs and not is_patched():
        raise Moeq2ggufError(f"{path} uses {' and '.join(needs)}, which stock llama.cpp cannot run (it refuses the "
                             "file: wrong number of tensors); build the patched llama.cpp with `moeq2gguf runtime "
                             "build` and load with patched=True")
    import llama_cpp
    kwargs = {}
    if f32_kv_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                              n_threads=n_threads or threads(), verbose=verbose, **kwargs)
    except ValueError as exc:
        raise Moeq2ggufError(f"llama.cpp could not load {path} ({exc}); it is not a GGUF file this llama.cpp runs") from exc
    try:
        yield llm
    finally:
        llm.close()


def tokenize(llm, text: str, add_special: bool = True) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)


def logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Next-token logits [len(tokens), n_vocab] for one sequence, from a fresh KV cache."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def generate(llm, prompt: str, max_tokens: int = 40) -> str:
    out = llm(prompt, max_tokens=max_tokens, temperature=0.0, echo=False)
    return out["choices"][0]["text"]


def run_logits(path: str | os.PathLike[str], tokens: Sequence[int], patched: bool = False, n_ctx: int = 512,
               n_threads: int | None = None) -> np.ndarray:
    """logits() of a file in a new process bound to the stock or the patched llama.cpp, whatever this
    process has imported. Errors of the load come back as Moeq2ggufError with llama.cpp's message."""
    from moeq2gguf.runtime.build import patched_env
    env = patched_env() if patched else {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    with tempfile.TemporaryDirectory(prefix="moeq2gguf-logits-") as tmp:
        np.save(Path(tmp) / "tokens.npy", np.asarray(tokens, dtype=np.int64))
        cmd = [sys.executable, "-m", "moeq2gguf.runtime.llama", str(path), tmp, str(n_ctx), str(n_threads or 0),
               "patched" if patched else "stock"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines[-8:]
            raise Moeq2ggufError(f"llama.cpp ({'patched' if patched else 'stock'}) could not run {path}: "
                                 + " | ".join(errors))
        return np.load(Path(tmp) / "logits.npy")


def _worker(argv: list[str]) -> int:
    """python -m moeq2gguf.runtime PATH DIR N_CTX N_THREADS stock|patched: DIR/tokens.npy -> DIR/logits.npy.
    llama.cpp's log goes to stderr, so a failed load says why."""
    path, folder, n_ctx, n_threads, kind = argv
    tokens = np.load(Path(folder) / "tokens.npy").tolist()
    try:
        bind(kind == "patched")
        import llama_cpp
        needs = patched_features(path)
        if needs and not is_patched():
            # stock llama.cpp must refuse the file itself (its log goes to stderr), never run it without the patch
            try:
                llama_cpp.Llama(model_path=str(path), n_ctx=int(n_ctx), verbose=True)
            except ValueError as exc:
                raise Moeq2ggufError(f"stock llama.cpp refused the file ({exc}): it uses {' and '.join(needs)}, which "
                                     "need the patched llama.cpp (`moeq2gguf runtime build`, then patched=True)") from exc
            raise Moeq2ggufError(f"stock llama.cpp loaded {path}, which uses {' and '.join(needs)}: it would run it "
                                 "wrong; the file lacks the tensors that make stock llama.cpp refuse it")
        with load(path, n_ctx=int(n_ctx), n_threads=int(n_threads) or None, patched=kind == "patched",
                  verbose=True) as llm:
            np.save(Path(folder) / "logits.npy", logits(llm, tokens))
    except (Moeq2ggufError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
