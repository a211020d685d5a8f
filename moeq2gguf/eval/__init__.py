from moeq2gguf.eval.perplexity import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
