"""Which GGML type each GGUF tensor gets.

llama.cpp never quantizes norms, biases, routers (ffn_gate_inp*) or the linear attention's short
convolution (ssm_conv1d): they stay F32 whatever the requested type, exactly as llama-quantize and llama.cpp's converter leave them.
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
KEEP_F32_ROLES = ("norm", "bias", "router", "conv")


def validate_type(type_name: str) -> str:
    from moeq2gguf.plan.mixes import MIXES
    name = type_name.upper()
    if name in FLOAT_TYPES or name in MIXES:
        return name
    raise Moeq2ggufError(f"--type {type_name} is unknown; choose one of {', '.join([*FLOAT_TYPES, *MIXES])}")


def is_float(type_name: str) -> bool:
    return type_name in FLOAT_TYPES


def tensor_type(source: TensorSource, type_name: str) -> Q:
    if source.role in KEEP_F32_ROLES or len(source.shape) == 1:
        return Q.F32
    return FLOAT_TYPES[type_name][0]


def file_type(type_name: str) -> F:
    from moeq2gguf.plan.mixes import MIXES
    return FLOAT_TYPES[type_name][1] if type_name in FLOAT_TYPES else MIXES[type_name].ftype


def assign(sources: list[TensorSource], type_name: str, spec, has_imatrix: bool, overrides=()) -> list[Q]:
    """The GGML type of every tensor: float export, or llama-quantize's rules for a mix. A tensor the
    checkpoint ships already quantized in a GGML format (GPT-OSS's MXFP4 experts) keeps it, as
    llama.cpp's converter does: its blocks are copied, never re-rounded."""
    if type_name in FLOAT_TYPES:
        if overrides:
            raise Moeq2ggufError("--tensor-type overrides apply to quantized mixes; pick a --type such as Q4_K_M")
        types = [tensor_type(s, type_name) for s in sources]
    else:
        from moeq2gguf.plan.mixes import assign_types
        types = assign_types([(s.name, s.shape) for s in sources], type_name, n_layer=spec.n_layers,
                             n_expert=spec.n_experts, n_head=spec.n_heads, n_head_kv=spec.n_kv_heads,
                             has_imatrix=has_imatrix, overrides=overrides)
    return [s.raw_qtype if s.raw_qtype is not None else t for s, t in zip(sources, types)]


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
