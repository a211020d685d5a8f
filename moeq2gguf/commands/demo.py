"""`moeq2gguf demo`: the main job on the bundled Qwen2-MoE model, start to finish."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from moeq2gguf import runtime
from moeq2gguf.calib import corpus
from moeq2gguf.commands.convert import convert

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEMO_MODEL = FIXTURES / "qwen2moe-tiny"
PROMPT = "class Parser:\n    def __init__(self"


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


def demo(workdir: str | None = None, model_dir: str | Path = DEMO_MODEL, mix: str = "Q4_K_M", eval_windows: int = 8) -> dict:
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
        results["quantized"] = compare_quants(model_dir, out_dir, mix, eval_windows)
        return results


def compare_quants(model_dir: Path, out_dir: Path, mix: str, eval_windows: int) -> list[dict]:
    """Our moequant file next to llama.cpp's own quant of the same mix (same size), against F32."""
    from moeq2gguf.eval import evaluate_many
    from moeq2gguf.runtime.llama_tools import llama_quantize

    base = out_dir / f"{model_dir.name}-F32.gguf"
    t0 = time.time()
    ours = convert(model_dir, out_dir / f"{model_dir.name}-{mix}-moequant.gguf", type=mix, method="moequant",
                   progress=False)
    t_ours = time.time() - t0
    t0 = time.time()
    theirs = llama_quantize(base, out_dir / f"{model_dir.name}-{mix}-llama.cpp.gguf", mix)
    t_theirs = time.time() - t0
    print(f"\n{mix}: moeq2gguf moequant (calibrated on the calib split) vs llama.cpp's own {mix}, "
          f"on {eval_windows} eval windows of 512 tokens against the F32 file:")
    rows = []
    for (name, path, seconds), res in zip([("llama.cpp rtn", theirs, t_theirs), ("moeq2gguf moequant", ours.output, t_ours)],
                                           evaluate_many([theirs, ours.output], base, "eval", 512, eval_windows, progress=False)):
        size = path.stat().st_size
        rows.append({"file": name, "bytes": size, "ppl_ratio": res.ppl_ratio, "kld_mean": res.kld_mean,
                     "same_top1_pct": res.same_top1_pct, "seconds": seconds})
        print(f"  {name:20} {size / 2**20:6.2f} MiB  PPL ratio {res.ppl_ratio:.4f}  mean KLD {res.kld_mean:.5f}  "
              f"same top-1 {res.same_top1_pct:5.1f}%  ({seconds:.1f} s)")
    return rows
