"""`moeq2gguf demo`: the main job on the bundled Qwen2-MoE model, start to finish."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from moeq2gguf import corpus, runtime
from moeq2gguf.convert import convert

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEMO_MODEL = FIXTURES / "qwen2moe-tiny"
PROMPT = "def read_config(path):\n    "


def next_token_agreement(model_dir: Path, gguf_path: Path, n_tokens: int = 256) -> tuple[float, float]:
    """Share of eval-split positions where llama.cpp and transformers (fp32) pick the same next
    token, and the largest logit difference relative to the largest logit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = tokenizer(corpus.read_text("eval")[: 20 * n_tokens])["input_ids"][:n_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    with runtime.load(gguf_path, n_ctx=n_tokens) as llm:
        got = runtime.logits(llm, tokens)
    return float((got.argmax(-1) == ref.argmax(-1)).mean()), float(np.abs(got - ref).max() / np.abs(ref).max())


def demo(workdir: str | None = None, model_dir: str | Path = DEMO_MODEL) -> dict:
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="moeq2gguf-demo-") as tmp:
        out_dir = Path(workdir) if workdir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {}
        print(f"model: {model_dir}")
        for type_name in ("F32", "F16"):
            t0 = time.time()
            res = convert(model_dir, out_dir / f"{model_dir.name}-{type_name}.gguf", type=type_name, progress=False)
            agree, rel = next_token_agreement(model_dir, res.output)
            results[type_name] = {"bytes": res.n_bytes, "agreement": agree, "max_rel_logit_error": rel}
            print(f"{type_name:>4}: {res.output.name} {res.n_bytes / 2**20:6.1f} MiB, converted in {time.time() - t0:4.1f} s; "
                  f"llama.cpp vs transformers on 256 eval tokens: same next token {100 * agree:5.1f}%, "
                  f"max relative logit error {rel:.1e}")
        with runtime.load(out_dir / f"{model_dir.name}-F16.gguf", n_ctx=256, f32_kv_cache=False) as llm:
            text = runtime.generate(llm, PROMPT, max_tokens=48)
        print("\nllama.cpp continues the prompt (greedy, F16 file):\n" + PROMPT + text)
        results["generated"] = text
        return results
