#!/usr/bin/env python
"""Hugging Face checkpoints with random weights at the exact shapes of the MoE models people quantize, for timing
and memory benchmarks without a model hub (issue 20). Any number of decoder layers.

    python tools/make_shape_checkpoint.py qwen1.5-moe-a2.7b OUT_DIR --layers 2
    python tools/make_shape_checkpoint.py deepseek-v3 OUT_DIR --layers 4     # 3 dense layers, then MoE

The folder holds what a hub download holds: config.json (the model's real values, num_hidden_layers set to
--layers), safetensors shards with the on-disk (per-expert) tensor names and a model.safetensors.index.json,
and a tokenizer (the bundled qwen2moe-tiny's or mixtral-tiny's: its few thousand tokens are padded to the real
vocabulary size by the converter). Tensor names and shapes come from transformers' own model of the family built
on the meta device and mapped to the checkpoint layout by transformers' weight conversion, so they are what
transformers writes. Weights: normal with std 0.02 (norms 1, DeepSeek-V3's selection bias 0), written as bf16,
one tensor in memory at a time per shard being filled.

Random weights route near uniformly (every expert gets about its share of tokens): a figure that depends on
routing (per-expert GPTQ time, rare-expert fallbacks) says so wherever it is quoted.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "moeq2gguf" / "fixtures"

# config.json values of the real models (hub configs; see the shape notes in docs/EVALUATION.md's references)
SHAPES: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=2048, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=8192,
        qkv_bias=True, tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643,
        eos_token_id=151643, tokenizer="qwen2moe-tiny"),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, tokenizer="qwen2moe-tiny"),
    "mixtral-8x7b": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, tokenizer="mixtral-tiny"),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], hidden_size=2048, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=102400, intermediate_size=10944,
        moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, scoring_func="softmax", rope_theta=1e4, rms_norm_eps=1e-6,
        max_position_embeddings=163840, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings":
                                                      4096, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707},
        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001, tokenizer="qwen2moe-tiny"),
    "deepseek-v3": dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, vocab_size=129280, intermediate_size=18432,
        moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=1e4, rms_norm_eps=1e-6,
        max_position_embeddings=163840, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings":
                                                      4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                      "mscale_all_dim": 1.0},
        num_nextn_predict_layers=0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        tokenizer="qwen2moe-tiny"),
}
SHARD_BYTES = 4 * 2**30


def parse_shape(text: str) -> tuple[str, int | None]:
    """NAME or NAME:LAYERS."""
    name, _, layers = text.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return name, int(layers) if layers else None


def config_for(name: str, layers: int, overrides: dict | None = None):
    """transformers' config of the shape with `layers` decoder layers (overrides: for scaled-down tests)."""
    import transformers
    values = {k: v for k, v in SHAPES[name].items() if k not in ("tokenizer", "model_type", "architectures")}
    values.update(num_hidden_layers=layers, **(overrides or {}))
    config = transformers.AutoConfig.for_model(SHAPES[name]["model_type"], **values)
    config.architectures = SHAPES[name]["architectures"]
    return config


def checkpoint_tensors(config) -> dict[str, tuple[int, ...]]:
    """On-disk tensor name -> shape, as transformers would save this model (per-expert names)."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = revert_weight_conversion(model, dict(model.state_dict()))
    return {k: tuple(v.shape) for k, v in state.items()}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(("norm.weight", "layernorm.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32)   # fp32 in the real checkpoints
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write(name: str, out_dir: Path, layers: int, overrides: dict | None = None, seed: int = 0,
          shard_bytes: int = SHARD_BYTES, log=print) -> Path:
    from safetensors.torch import save_file
    t0 = time.time()
    config = config_for(name, layers, overrides)
    tensors = checkpoint_tensors(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in tensors.items():   # group into shards of at most shard_bytes (bf16)
        n = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        data = {k: random_tensor(k, tensors[k], generator) for k in keys}
        total += sum(v.numel() * v.element_size() for v in data.values())
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
        del data
        log(f"  {file}: {len(keys)} tensors")
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    source = FIXTURES / SHAPES[name]["tokenizer"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / f, tmp / f)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log(f"wrote {out_dir}: {name} with {layers} layers, {len(tensors)} tensors, {total / 2**30:.2f} GiB in "
        f"{time.time() - t0:.0f} s")
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help=f"one of {', '.join(SHAPES)}, optionally NAME:LAYERS")
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: NAME:LAYERS, else 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    name, layers = parse_shape(args.shape)
    write(name, Path(args.output), args.layers or layers or 2, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
