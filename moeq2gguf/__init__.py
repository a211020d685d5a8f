"""moeq2gguf: MoE-aware quantization of Hugging Face Mixture-of-Experts checkpoints into GGUF."""
from moeq2gguf.threads import prefer_passive_waiting, set_threads

prefer_passive_waiting()   # before torch loads its OpenMP runtime (moeq2gguf/threads.py)

from moeq2gguf.bench import BenchRow, bench_file  # noqa: E402
from moeq2gguf.convert import ConvertResult, convert  # noqa: E402
from moeq2gguf.errors import Moeq2ggufError  # noqa: E402
from moeq2gguf.inspect import inspect  # noqa: E402

__version__ = "0.1.0"


def demo(**kwargs):
    from moeq2gguf.demo import demo as _demo
    return _demo(**kwargs)


__all__ = ["bench_file", "BenchRow", "convert", "ConvertResult", "demo", "inspect", "Moeq2ggufError", "set_threads", "__version__"]
