from moeq2gguf.eval.perplexity import EvalResult, evaluate, evaluate_many

__all__ = ["EvalResult", "evaluate", "evaluate_many"]
