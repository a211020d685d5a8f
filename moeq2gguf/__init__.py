"""moeq2gguf: MoE-aware quantization of Hugging Face Mixture-of-Experts checkpoints into GGUF.

The public functions import their modules (and torch) on first use, so that `import moeq2gguf` is cheap and
the light parts (the runtime's workers, the build) run without the converter's dependencies.
"""
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.threads import prefer_passive_waiting, set_threads

prefer_passive_waiting()   # before anything loads an OpenMP runtime (moeq2gguf/threads.py)

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    "convert": ("moeq2gguf.commands.convert", "convert"),
    "ConvertResult": ("moeq2gguf.commands.convert", "ConvertResult"),
    "inspect": ("moeq2gguf.commands.inspect", "inspect"),
    "diff": ("moeq2gguf.commands.diff", "diff"),
    "demo": ("moeq2gguf.commands.demo", "demo"),
    "calibrate": ("moeq2gguf.calib", "calibrate"),
    "evaluate": ("moeq2gguf.eval", "evaluate"),
    "bench_file": ("moeq2gguf.runtime.bench", "bench_file"),
    "BenchRow": ("moeq2gguf.runtime.bench", "BenchRow"),
}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib
        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moeq2gguf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [*_PUBLIC, "Moeq2ggufError", "set_threads", "__version__"]
