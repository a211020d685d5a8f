"""`moeq2gguf eval`: PPL, KLD and same-top-1 of a GGUF against its float GGUF, through llama.cpp.

Windows follow llama-perplexity: the text is tokenized once (with BOS when the vocabulary adds one),
cut into non-overlapping windows of ctx tokens, each window's first token replaced by BOS when the
vocabulary adds one, and positions ctx/2 .. ctx-2 scored against the next token. Both models are
loaded at once and each window is run through both, so memory does not grow with the number of windows.

A quant made with --smooth per-expert or --expert-hadamard needs the patched llama.cpp, and a process binds
one llama.cpp for good (runtime.py): unless this process already runs the patched one, such an evaluation
runs whole (base and every quant) in a new process bound to it (perplexity._worker). The
patched llama.cpp gives a stock file the stock logits (tests/test_runtime_patched.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moeq2gguf import runtime
from moeq2gguf.calib import corpus
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.eval.metrics import QualityAccumulator


@dataclass(frozen=True)
class EvalResult:
    quant: str
    base: str
    ctx: int
    windows: int
    tokens_scored: int
    ppl_base: float
    ppl_quant: float
    ppl_ratio: float
    kld_mean: float
    kld_p99: float
    kld_p99_9: float
    same_top1_pct: float
    seconds: float
    # per-token KLD counts in metrics.LogHistogram's bins (for eval --plot); not in the JSON summary
    kld_hist_counts: list[int] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> str:
        summary = asdict(self)
        summary.pop("kld_hist_counts")
        return json.dumps(summary, indent=1)

    def table(self) -> str:
        return (f"windows {self.windows} x ctx {self.ctx} ({self.tokens_scored} tokens scored)\n"
                f"PPL base {self.ppl_base:.4f}  quant {self.ppl_quant:.4f}  ratio {self.ppl_ratio:.4f}\n"
                f"KLD mean {self.kld_mean:.6f}  p99 {self.kld_p99:.6f}  p99.9 {self.kld_p99_9:.6f}\n"
                f"same top-1 {self.same_top1_pct:.2f}%")


def _gguf_identity(path: Path) -> tuple[str, list[str]]:
    import gguf
    if not path.is_file():
        raise Moeq2ggufError(f"{path} does not exist; pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise Moeq2ggufError(f"{path} is not a readable GGUF file ({exc})") from exc
    arch_field = reader.get_field("general.architecture")
    tokens_field = reader.get_field("tokenizer.ggml.tokens")
    if arch_field is None or tokens_field is None:
        raise Moeq2ggufError(f"{path} lacks general.architecture or tokenizer.ggml.tokens; it is not a model GGUF")
    return arch_field.contents(), tokens_field.contents()


def check_comparable(quant: Path, base: Path) -> None:
    q_arch, q_tokens = _gguf_identity(quant)
    b_arch, b_tokens = _gguf_identity(base)
    if q_arch != b_arch:
        raise Moeq2ggufError(f"{quant.name} is a {q_arch} model but {base.name} is {b_arch}; compare a quant with its own float model")
    if q_tokens != b_tokens:
        raise Moeq2ggufError(f"{quant.name} and {base.name} have different vocabularies ({len(q_tokens)} vs {len(b_tokens)} tokens); "
                             "compare a quant with its own float model")


def evaluate(quant: str | os.PathLike[str], base: str | os.PathLike[str], text: str = "eval", ctx: int = 512,
             chunks: int | None = None, progress: bool = True) -> EvalResult:
    """Compare QUANT.gguf with BASE.gguf on `text`: a split name (eval/calib/train) or a .txt/.jsonl path."""
    return evaluate_many([quant], base, text, ctx, chunks, progress)[0]


def evaluate_many(quants: list[str | os.PathLike[str]], base: str | os.PathLike[str], text: str = "eval", ctx: int = 512,
                  chunks: int | None = None, progress: bool = True) -> list[EvalResult]:
    """Several quants of one base in one pass: each window's base logits are computed once."""
    from moeq2gguf.config import EvalConfig
    EvalConfig(text=text, ctx=ctx, chunks=chunks)   # the option checks
    t0 = time.time()
    quants, base = [Path(q) for q in quants], Path(base)
    for q in quants:
        check_comparable(q, base)
    if any(runtime.patched_features(q) for q in quants) and not runtime.is_patched():
        return _evaluate_in_patched_process(quants, base, text, ctx, chunks, progress)
    content = corpus.read_text(text)
    first = ctx // 2
    accs = [QualityAccumulator() for _ in quants]
    # One model in memory at a time: the base's logits of every scored position go to a file on disk first (as
    # llama-perplexity's --kl-divergence-base does), then each quant is loaded in turn and compared window by window.
    with tempfile.TemporaryDirectory(prefix="moeq2gguf-eval-") as tmp:
        with runtime.load(base, n_ctx=ctx) as base_llm:
            tokens = np.asarray(runtime.tokenize(base_llm, content), dtype=np.int64)
            n_windows = len(tokens) // ctx
            if chunks is not None:
                n_windows = min(n_windows, chunks)
            if n_windows < 1:
                raise Moeq2ggufError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}; "
                                     "give more text or a smaller --ctx")
            bos = base_llm.token_bos() if base_llm._model.add_bos_token() else None
            windows = tokens[:n_windows * ctx].reshape(n_windows, ctx).copy()
            if bos is not None:
                windows[:, 0] = bos
            base_logits = None
            for w in tqdm(range(n_windows), desc="eval base", unit="window", disable=not progress):
                logits = runtime.logits(base_llm, windows[w])[first:ctx - 1]
                if base_logits is None:
                    base_logits = np.lib.format.open_memmap(Path(tmp) / "base.npy", mode="w+", dtype=np.float32,
                                                            shape=(n_windows, *logits.shape))
                base_logits[w] = logits
            base_logits.flush()
        for q, acc in zip(quants, accs):
            with runtime.load(q, n_ctx=ctx) as llm:
                for w in tqdm(range(n_windows), desc=f"eval {q.name}", unit="window", disable=not progress):
                    acc.add(np.asarray(base_logits[w]), runtime.logits(llm, windows[w])[first:ctx - 1],
                            windows[w][first + 1:])
        del base_logits
    seconds = time.time() - t0
    return [EvalResult(quant=str(q), base=str(base), ctx=ctx, windows=n_windows, seconds=seconds, **acc.summary(),
                       kld_hist_counts=acc.kld_hist.counts.tolist())
            for q, acc in zip(quants, accs)]


def _evaluate_in_patched_process(quants: list[Path], base: Path, text: str | os.PathLike[str], ctx: int,
                                 chunks: int | None, progress: bool) -> list[EvalResult]:
    """evaluate_many in a new process bound to the patched llama.cpp (its progress bar on this stderr)."""
    from moeq2gguf.runtime.build import patched_env
    request = {"quants": [str(q) for q in quants], "base": str(base), "text": str(text), "ctx": ctx, "chunks": chunks,
               "progress": progress}
    with tempfile.TemporaryDirectory(prefix="moeq2gguf-eval-") as tmp:
        out = Path(tmp) / "results.json"
        code = "import sys; from moeq2gguf.eval.perplexity import _worker; sys.exit(_worker(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(request), str(out)], env=patched_env(),
                              stdout=subprocess.DEVNULL)
        doc = json.loads(out.read_text()) if out.is_file() else {}
    if "error" in doc:
        raise Moeq2ggufError(doc["error"])
    if proc.returncode != 0 or "results" not in doc:
        raise Moeq2ggufError(f"the evaluation on the patched llama.cpp stopped with exit code {proc.returncode} "
                             "(its error is on stderr above)")
    return [EvalResult(**r) for r in doc["results"]]


def _worker(argv: list[str]) -> int:
    """REQUEST_JSON OUT_JSON: evaluate_many in a process started with patched_env()."""
    request, out = json.loads(argv[0]), Path(argv[1])
    try:
        import llama_cpp  # noqa: F401  (binds LLAMA_CPP_LIB_PATH of the environment this process was given)
        runtime.bind(patched=True)   # checks that it is the patched one
        results = evaluate_many(request["quants"], request["base"], request["text"], request["ctx"], request["chunks"],
                                request["progress"])
    except Moeq2ggufError as exc:
        out.write_text(json.dumps({"error": str(exc)}))
        return 2
    out.write_text(json.dumps({"results": [asdict(r) for r in results]}))
    return 0
