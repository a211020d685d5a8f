"""Family adapters registered by Hugging Face architecture name, imported lazily."""
from __future__ import annotations

import importlib

from moeq2gguf.errors import UnsupportedArchitectureError

# HF architecture -> module under moeq2gguf.models; adding a family means one file and one line here.
ARCH_TO_MODULE: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekForCausalLM": "deepseek",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV3ForCausalLM": "deepseek2",
    "GptOssForCausalLM": "gpt_oss",
    "Glm4MoeForCausalLM": "glm4moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "Qwen3_5MoeForCausalLM": "qwen35moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen35moe",
    "Llama4ForCausalLM": "llama4",
    "Llama4ForConditionalGeneration": "llama4",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
}

_ADAPTERS: dict[str, type] = {}


def register(cls):
    for arch in cls.hf_architectures:
        _ADAPTERS[arch] = cls
    return cls


def supported_architectures() -> list[str]:
    return sorted(ARCH_TO_MODULE)


def adapter_class(config: dict):
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json has no 'architectures' entry; supported: " + ", ".join(supported_architectures()))
    arch = archs[0]
    if arch not in ARCH_TO_MODULE:
        raise UnsupportedArchitectureError(
            f"architecture {arch} is not supported; supported: {', '.join(supported_architectures())}")
    importlib.import_module(f"moeq2gguf.models.{ARCH_TO_MODULE[arch]}")
    return _ADAPTERS[arch]


def open_model(model_dir):
    """The adapter for a checkpoint directory (reads config.json and the tensor index only)."""
    from moeq2gguf.io.checkpoint import CheckpointReader
    reader = CheckpointReader(model_dir)
    return adapter_class(reader.config)(reader)
