"""Issue 20's tools on the CPU: the real-shape checkpoint writer (scaled down here: same families, layouts and
keys, small widths) writes what transformers and the converter read, and the conversion's stage profile accounts
for the layers."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moeq2gguf import convert, runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_shape_checkpoint as shapes  # noqa: E402

SMALL = {   # per shape: widths small enough for a test, everything else (family, routing, layout) as the real model
    "qwen1.5-moe-a2.7b": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
                              moe_intermediate_size=256, shared_expert_intermediate_size=256, num_experts=6),
    "qwen3-30b-a3b": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          intermediate_size=256, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2),
    "mixtral-8x7b": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                         num_local_experts=4),
    "deepseek-v2-lite": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
                             moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=64,
                             qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "deepseek-v3": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
                        moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                        first_k_dense_replace=1),
}


# two of the five shapes within the suite's time budget: MLA with a dense first layer (the DeepSeek-V3 layout) and a
# shared expert with a sigmoid gate (Qwen1.5); the others write through the same code (tools/bench_scale.py runs them)
@pytest.mark.parametrize("name", ["deepseek-v3", "qwen1.5-moe-a2.7b"])
def test_shape_checkpoints_load_and_convert(name, tmp_path):
    assert set(SMALL) == set(shapes.SHAPES)
    small = {**SMALL[name], "vocab_size": 4096}
    ckpt = shapes.write(name, tmp_path / name, layers=2, overrides=small, shard_bytes=2**20, log=lambda line: None)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)   # every key where transformers wants it
    assert model.config.num_hidden_layers == 2
    result = convert(ckpt, tmp_path / "q.gguf", type="Q4_K_M", method="moequant", calib_windows=2, calib_ctx=64,
                     progress=False, profile=True)   # the adapter reads every tensor (leftovers are an error)
    with runtime.load(result.output) as llm:
        assert np.isfinite(runtime.logits(llm, list(range(5, 21)))).all()
    stages = result.profile.to_dict()
    assert {"read", "forward", "statistics", "scale search", "gptq", "round", "pack", "write", "tokenize"} <= \
        set(stages["stages"])
    assert set(stages["per_layer_seconds"]) == {"0", "1"}


def test_the_real_shapes_are_the_hub_configs():
    """Names and shapes transformers would write, at the real widths (meta device: nothing allocated)."""
    tensors = shapes.checkpoint_tensors(shapes.config_for("qwen1.5-moe-a2.7b", 1))
    assert tensors["model.layers.0.mlp.experts.59.down_proj.weight"] == (2048, 1408)
    assert tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"] == (5632, 2048)
    assert tensors["model.embed_tokens.weight"] == (151936, 2048)
    v3 = shapes.checkpoint_tensors(shapes.config_for("deepseek-v3", 4))
    assert v3["model.layers.3.mlp.experts.255.gate_proj.weight"] == (2048, 7168)
    assert v3["model.layers.3.mlp.gate.e_score_correction_bias"] == (256,)
    assert "model.layers.2.mlp.gate.weight" not in v3   # layers 0-2 are dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (issue 20's GPU check)")
def test_cuda_and_cpu_conversions_agree(tmp_path):
    """The same model converted with --device cuda and --device cpu: files whose KLD to each other is tiny."""
    from moeq2gguf.eval import evaluate
    small = {**SMALL["qwen1.5-moe-a2.7b"], "vocab_size": 4096}
    ckpt = shapes.write("qwen1.5-moe-a2.7b", tmp_path / "m", layers=2, overrides=small, log=lambda line: None)
    files = {d: convert(ckpt, tmp_path / f"{d}.gguf", type="Q4_K_M", method="moequant", device=d, calib_windows=4,
                        calib_ctx=128, progress=False).output for d in ("cpu", "cuda")}
    f32 = convert(ckpt, tmp_path / "f32.gguf", type="F32", progress=False).output
    a, b = (evaluate(files[d], f32, "eval", ctx=128, chunks=4, progress=False) for d in ("cpu", "cuda"))
    cross = evaluate(files["cuda"], files["cpu"], "eval", ctx=128, chunks=4, progress=False)
    assert cross.kld_mean < 0.1 * min(a.kld_mean, b.kld_mean), (cross, a, b)


def test_stage_peak_counts_memory_freed_before_the_stage_ends():
    """convert --profile's peak RSS per stage is sampled while the stage runs: 256 MiB allocated, touched and freed
    inside a stage shows in its peak (a reading at the stage's end alone would miss it), and in the enclosing stage's."""
    import time
    from moeq2gguf import profile
    with profile.collect() as prof:
        with profile.stage("outer", 0):
            base = profile._rss_mib()
            with profile.stage("inner"):
                block = np.ones(64 * 2**20, dtype=np.float32)   # 256 MiB, every page written
                time.sleep(10 * profile.SAMPLE_SECONDS)
                del block
    totals = prof.totals()
    assert totals["inner"].rss_mib > base + 200, (totals["inner"].rss_mib, base)
    assert totals["outer"].rss_mib >= totals["inner"].rss_mib
