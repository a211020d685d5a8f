"""The llama.cpp side: llama-cpp-python as the runtime (llama.py: load a GGUF, tokenize, logits), the llama.cpp
builds (build.py: stock for this CPU, patched with patches/, CUDA), CPU feature choice and the self-check
(cpu_features.py, selfcheck.py), llama.cpp's own tools (llama_tools.py) and the speed benchmark (bench.py,
bench_worker.py). The names below are llama.py's."""
from moeq2gguf.runtime.llama import (PATCHED_FEATURES, bind, bound_library, generate, is_patched, load, logits,
                                     patched_features, run_logits, tokenize)

__all__ = ["PATCHED_FEATURES", "bind", "bound_library", "generate", "is_patched", "load", "logits", "patched_features",
           "run_logits", "tokenize"]
