"""moeq2gguf: MoE-aware quantization of Hugging Face Mixture-of-Experts checkpoints into GGUF."""
from moeq2gguf.bench import BenchRow, bench_file
from moeq2gguf.convert import ConvertResult, convert
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.inspect import inspect

__version__ = "0.1.0"


def demo(**kwargs):
    from moeq2gguf.demo import demo as _demo
    return _demo(**kwargs)


__all__ = ["bench_file", "BenchRow", "convert", "ConvertResult", "demo", "inspect", "Moeq2ggufError", "__version__"]
