"""One `moeq2gguf bench` measurement (one file, one thread count) in a process of its own.

moeq2gguf.runtime.bench runs this file as a script, not with `-m`: importing the moeq2gguf package loads
torch (about 190 MiB resident), which would then count in this process's peak RSS. So this file
imports only the standard library, numpy and llama_cpp.

Protocol: one JSON request on stdin ({"path", "threads", "ctx", "gen", "repeats", "text"}), one JSON
object on stdout: the measurement, or {"error": "..."} with exit code 2.

Peak RSS is VmHWM of /proc/self/status, read last: the high-water mark of this process's own
address space. getrusage's ru_maxrss is not used because Linux carries the hiwater mark of the
address space a process had before exec over into it, so a child started from a large parent
(pytest with torch loaded) would report the parent's size.
"""
from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import numpy as np

import llama_cpp

# ggml.h's enum ggml_log_level (llama_cpp/_logger.py's comment has the older numbering)
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5


class BenchError(Exception):
    pass


class _LlamaLog:
    """Keep llama.cpp's error lines (to explain a failed load) and drop the rest, which would
    otherwise go to stderr."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._in_error = False
        self.callback = llama_cpp.llama_log_callback(self._on_log)   # referenced here so it is not collected
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            self._in_error = level == GGML_LOG_LEVEL_ERROR
        if self._in_error:
            self.errors.append(text.decode("utf-8", "replace"))

    def reason(self) -> str:
        lines = [line.strip() for line in "".join(self.errors).splitlines() if line.strip()]
        # llama_model_load's "error loading model: <why>" is the informative one; the rest repeat "failed to load"
        why = [line.split("error loading model: ", 1)[-1] for line in lines if "error loading model" in line] or lines
        return why[0] if why else "no error message from llama.cpp"


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/self/status has no VmHWM line; peak RSS needs Linux")


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def _prompt_tokens(vocab, text: str, ctx: int, n_vocab: int) -> tuple[list[int], str]:
    """ctx tokens of `text` in the model's own tokenizer (BOS as the model adds it), repeated if the
    text is short; deterministic random ids within the vocabulary if it yields no tokens."""
    data = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(data) + 16))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False) if data else 0
    if n > 0:
        tokens = list(buf[:n])
        return (tokens * (ctx // n + 1))[:ctx], "eval split text"
    return np.random.default_rng(0).integers(0, n_vocab, ctx).tolist(), "random token ids"


def measure(path: str, threads: int, ctx: int, gen: int, repeats: int, text: str) -> dict:
    log = _LlamaLog()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP     # as llama_cpp.Llama(use_mmap=True), its default
    t0 = time.perf_counter()
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    load_s = time.perf_counter() - t0
    if not model:
        raise BenchError(f"llama.cpp could not load {path}: {log.reason()}; this llama.cpp "
                         f"(llama-cpp-python {llama_cpp.__version__}) does not run this file")
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = ctx + gen
        cparams.n_batch = cparams.n_ubatch = ctx      # the whole prompt in one llama_decode
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED   # llama_cpp.Llama's default
        t0 = time.perf_counter()
        lctx = llama_cpp.llama_init_from_model(model, cparams)
        context_s = time.perf_counter() - t0
        if not lctx:
            raise BenchError(f"llama.cpp could not create a context of {ctx + gen} tokens for {path}: {log.reason()}")
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
            tokens, prompt_source = _prompt_tokens(vocab, text, ctx, n_vocab)
            runs = _timed_runs(lctx, tokens, n_vocab, gen, repeats)
        finally:
            llama_cpp.llama_free(lctx)
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, desc, len(desc))
        info = {"architecture": _meta(model, "general.architecture"), "file_type": _meta(model, "general.file_type"),
                "moeq2gguf_type": _meta(model, "moeq2gguf.type"), "description": desc.value.decode("utf-8", "replace"),
                "n_params": int(llama_cpp.llama_model_n_params(model)), "n_vocab": n_vocab}
    finally:
        llama_cpp.llama_model_free(model)
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    return {**info, "threads": threads, "ctx": ctx, "gen": gen, "repeats": repeats, "prompt": prompt_source,
            "load_s": load_s, "context_s": context_s, "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
            "pp_runs": pp, "tg_runs": tg, "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
            "library": llama_cpp.llama_cpp._lib._name,     # the libllama bound: stock or patched (LLAMA_CPP_LIB_PATH)
            "peak_rss_bytes": peak_rss_bytes()}


def _timed_runs(lctx, tokens: list[int], n_vocab: int, gen: int, repeats: int) -> list[tuple[float, float]]:
    """(prompt tok/s, generation tok/s) per run, after one untimed warm-up run (which also pages in
    the mmapped weights). Each run starts from an empty KV cache: the prompt in one llama_decode, then
    `gen` greedy tokens one llama_decode each, continuing the prompt."""
    memory = llama_cpp.llama_get_memory(lctx)
    prompt = (llama_cpp.llama_token * len(tokens))(*tokens)
    one = (llama_cpp.llama_token * 1)()

    def decode(buf, n: int) -> None:
        rc = llama_cpp.llama_decode(lctx, llama_cpp.llama_batch_get_one(buf, n))   # logits of the last token only
        if rc != 0:
            raise BenchError(f"llama_decode of {n} tokens returned {rc}")

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).argmax())

    def run(n_gen: int) -> tuple[float, float]:
        llama_cpp.llama_memory_clear(memory, True)
        t0 = time.perf_counter()
        decode(prompt, len(tokens))
        llama_cpp.llama_synchronize(lctx)
        t1 = time.perf_counter()
        for _ in range(n_gen):
            one[0] = next_token()
            decode(one, 1)
        llama_cpp.llama_synchronize(lctx)
        t2 = time.perf_counter()
        return len(tokens) / (t1 - t0), n_gen / (t2 - t1) if n_gen else 0.0

    run(min(gen, 8))
    return [run(gen) for _ in range(repeats)]


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        result = measure(request["path"], int(request["threads"]), int(request["ctx"]), int(request["gen"]),
                         int(request["repeats"]), request.get("text", ""))
    except BenchError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
