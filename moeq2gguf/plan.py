"""Which GGML type each GGUF tensor gets.

llama.cpp never quantizes norms, biases or routers (ffn_gate_inp*): they stay F32 whatever the
requested type, exactly as llama-quantize and llama.cpp's converter leave them.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import TensorSource

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

FLOAT_TYPES: dict[str, tuple[Q, F]] = {
    "F32": (Q.F32, F.ALL_F32),
    "F16": (Q.F16, F.MOSTLY_F16),
    "BF16": (Q.BF16, F.MOSTLY_BF16),
}
# The quantized mixes the CLI will accept once the quantizers land (issues 4-6).
QUANT_MIXES = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS")
KEEP_F32_ROLES = ("norm", "bias", "router")


def validate_type(type_name: str) -> str:
    name = type_name.upper()
    if name in FLOAT_TYPES:
        return name
    if name in QUANT_MIXES:
        raise Moeq2ggufError(f"--type {name} is not available yet: this build writes F32, F16 and BF16 only")
    raise Moeq2ggufError(f"--type {type_name} is unknown; choose one of {', '.join([*FLOAT_TYPES, *QUANT_MIXES])}")


def tensor_type(source: TensorSource, type_name: str) -> Q:
    if source.role in KEEP_F32_ROLES or len(source.shape) == 1:
        return Q.F32
    return FLOAT_TYPES[type_name][0]


def file_type(type_name: str) -> F:
    return FLOAT_TYPES[type_name][1]


def encode_float(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """The tensor's bytes in a float GGML type (uint8 rows for BF16, as gguf-py writes them)."""
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    if qtype == Q.BF16:
        return gguf.quants.quantize(data, Q.BF16)
    raise AssertionError(f"not a float type: {qtype!r}")
