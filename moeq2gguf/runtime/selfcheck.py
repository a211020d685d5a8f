"""One quantized matmul through llama.cpp in a child process, before anything relies on it.

A llama.cpp library compiled for instructions this CPU cannot run (ggml's AMX kernels on some AMX Xeons at
the pinned commit, or a -march=native build made on another machine) loads fine and F32 models run; the
process dies with SIGILL at the first quantized matmul, taking pytest or a conversion with it.
`check(lib_dir)` runs that matmul in a child: a tiny one-block model with Q4_0 and Q8_0 weights (written
with gguf-py, no vocabulary) evaluated on one batch through llama-cpp-python bound to lib_dir, and turns a
crash into one message naming the cause and the fix. The same child is the AMX probe of
runtime_build.build_stock() (docs/PLATFORMS.md).

The child runs this file through runpy (`--child MODEL THREADS`) importing only numpy and llama_cpp, so a
fault in it is llama.cpp's, not torch's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

N_EMBD, N_FF, N_VOCAB, N_HEAD, N_BATCH = 256, 512, 256, 4, 32   # widths that ggml's AMX matmul accepts (x32)
TIMEOUT_S = 120


def write_tiny_model(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A 1-block llama model (about 0.4 MB) whose attention and FFN weights are Q4_0 / Q8_0."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_tokenizer_model("no_vocab")
    w.add_vocab_size(N_VOCAB)
    q4, q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", weight(N_VOCAB, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", gguf.quants.quantize(weight(N_VOCAB, N_EMBD), q8), raw_dtype=q8)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(weight(N_EMBD, N_EMBD), q4), raw_dtype=q4)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", gguf.quants.quantize(weight(N_FF, N_EMBD), q4), raw_dtype=q4)
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(weight(N_FF, N_EMBD), q8), raw_dtype=q8)
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(weight(N_EMBD, N_FF), q4), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _child(model: str, threads: int) -> int:
    """Evaluate one batch of the tiny model; exit 0 with finite logits, 3 otherwise (a crash kills us first)."""
    import numpy as np

    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_batch=N_BATCH, n_ubatch=N_BATCH, logits_all=True,
                          n_threads=threads, verbose=False)
    llm.eval(list(range(N_BATCH)))   # a batch: ggml's tiled (AMX) matmul
    llm.eval([N_BATCH])              # one token: its vector path
    scores = np.array(llm.scores[:N_BATCH + 1], dtype=np.float32)
    llm.close()
    if not np.isfinite(scores).all() or not scores.any():
        print(f"the tiny model's logits are not finite (or all zero) on {llama_cpp.llama_cpp._lib._name}",
              file=sys.stderr)
        return 3
    print(f"ok: {N_BATCH} + 1 tokens through Q4_0/Q8_0 matmuls on {llama_cpp.llama_cpp._lib._name}")
    return 0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    lib_dir: str          # the libraries checked ("" = llama-cpp-python's own)
    returncode: int       # the child's; negative: killed by that signal; None-like 0 when ok
    output: str           # the child's stdout and stderr, last lines
    seconds: float

    @property
    def signal_name(self) -> str | None:
        if self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return None


def run_child(lib_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
              timeout: float = TIMEOUT_S) -> CheckResult:
    """The tiny model's quantized matmuls in a child bound to lib_dir (LLAMA_CPP_LIB_PATH; None: the installed
    llama-cpp-python's libraries, or LLAMA_CPP_LIB_PATH as this process has it)."""
    from moeq2gguf.threads import threads as default_threads
    env = dict(os.environ)
    if lib_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moeq2gguf-selfcheck-") as tmp:
        model = write_tiny_model(Path(tmp) / "tiny-q4_0.gguf")
        argv = [__file__, "--child", str(model), str(threads or default_threads())]
        # runpy, not `python selfcheck.py`: a script's folder would come first on sys.path (moeq2gguf/inspect.py)
        cmd = [sys.executable, "-c", f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], "
               "run_name='__main__')"]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            code, output = proc.returncode, proc.stderr + proc.stdout   # the child's verdict (stdout) last
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            code, output = -signal.SIGKILL, (out.decode() if isinstance(out, bytes) else out) + f"\ntimed out after {timeout:.0f} s"
    tail = "\n".join(output.strip().splitlines()[-12:])
    return CheckResult(code == 0, str(lib_dir or env.get("LLAMA_CPP_LIB_PATH", "")), code, tail,
                       time.perf_counter() - t0)


def explain(result: CheckResult) -> str:
    """One message for a failed check: what happened, why it happens, how to fix it."""
    from moeq2gguf.runtime.cpu_features import this_machine
    where = result.lib_dir or "llama-cpp-python's own libraries (llama_cpp/lib)"
    choice = this_machine()
    rebuild = ("rebuild them for this CPU: `make clean && make setup` in the moeq2gguf checkout (its build enables only "
               "the instruction sets this CPU reports, AMX only after a probe); for a llama-cpp-python you installed "
               f"yourself: CMAKE_ARGS=\"{' '.join(choice.cmake_args())}\" pip install --force-reinstall --no-cache-dir "
               "llama-cpp-python (docs/PLATFORMS.md)")
    if result.returncode == -signal.SIGILL:
        return (f"llama.cpp stopped with an illegal instruction (SIGILL) running a quantized matmul with {where}: it was "
                f"compiled for instructions this CPU ({choice.model or choice.machine}) cannot execute (ggml's AMX "
                f"kernels on some AMX Xeons, or a -march=native build made on another machine). Fix: {rebuild}")
    tail = result.output.replace("\n", " | ")
    if result.signal_name and "timed out" in result.output:
        return (f"llama.cpp did not finish a one-batch quantized matmul with {where} in {TIMEOUT_S} s (killed). "
                f"Fix: {rebuild}; if it persists, run `moeq2gguf runtime check -v` and report its output")
    if result.signal_name:
        return (f"llama.cpp crashed ({result.signal_name}) running a quantized matmul with {where}. Last output: "
                f"{tail or '(none)'}. Fix: {rebuild}")
    return (f"llama.cpp could not run a tiny quantized model with {where} (exit {result.returncode}): "
            f"{tail or '(no output)'}. Fix: reinstall it with `make setup`; {rebuild}")


def check(lib_dir: str | os.PathLike[str] | None = None, threads: int | None = None) -> CheckResult:
    """run_child(), raising Moeq2ggufError with explain()'s message when the child fails."""
    from moeq2gguf.errors import Moeq2ggufError
    result = run_child(lib_dir, threads)
    if not result.ok:
        raise Moeq2ggufError(explain(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], int(sys.argv[3])))
    print("usage: selfcheck.py --child MODEL THREADS (the parent side is `moeq2gguf runtime check`)", file=sys.stderr)
    sys.exit(2)
