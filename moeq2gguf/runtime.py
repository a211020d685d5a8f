"""llama-cpp-python as the runtime the project targets: load a GGUF, tokenize, get logits."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moeq2gguf.errors import Moeq2ggufError


@contextlib.contextmanager
def load(path: str | os.PathLike[str], n_ctx: int = 512, f32_kv_cache: bool = True,
         n_threads: int | None = None) -> Iterator["object"]:
    """A llama_cpp.Llama with logits for every position. An F32 KV cache by default, so that a
    comparison with transformers is about the weights, not the cache's fp16 rounding (router
    near-ties flip at ~1e-3)."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise Moeq2ggufError(f"{path} does not exist; pass a .gguf file")
    kwargs = {}
    if f32_kv_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                              n_threads=n_threads or os.cpu_count(), verbose=False, **kwargs)
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
