"""llama-quantize's type mixes: which GGML type each tensor gets for a named ftype (Q4_K_M, ...).

A port of llama_tensor_get_type in the pinned llama.cpp's src/llama-quant.cpp for the ftypes this
project writes, the i-quant mixes (IQ1_S .. IQ3_M) included. Same mix in, same
type per tensor out: tested against llama-quantize's own files.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import gguf

from moeq2gguf.errors import Moeq2ggufError

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class Mix:
    name: str
    ftype: F
    default: Q


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0), Mix("Q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
    Mix("Q5_0", F.MOSTLY_Q5_0, Q.Q5_0), Mix("Q5_1", F.MOSTLY_Q5_1, Q.Q5_1), Mix("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0),
    Mix("Q2_K", F.MOSTLY_Q2_K, Q.Q2_K), Mix("Q2_K_S", F.MOSTLY_Q2_K_S, Q.Q2_K),
    Mix("Q3_K_S", F.MOSTLY_Q3_K_S, Q.Q3_K), Mix("Q3_K_M", F.MOSTLY_Q3_K_M, Q.Q3_K), Mix("Q3_K_L", F.MOSTLY_Q3_K_L, Q.Q3_K),
    Mix("Q4_K_S", F.MOSTLY_Q4_K_S, Q.Q4_K), Mix("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K),
    Mix("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K), Mix("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K), Mix("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K),
    Mix("IQ4_NL", F.MOSTLY_IQ4_NL, Q.IQ4_NL), Mix("IQ4_XS", F.MOSTLY_IQ4_XS, Q.IQ4_XS),
    # the i-quant mixes (their formats: formats/lattice.py)
    Mix("IQ1_S", F.MOSTLY_IQ1_S, Q.IQ1_S), Mix("IQ1_M", F.MOSTLY_IQ1_M, Q.IQ1_M),
    Mix("IQ2_XXS", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS), Mix("IQ2_XS", F.MOSTLY_IQ2_XS, Q.IQ2_XS),
    Mix("IQ2_S", F.MOSTLY_IQ2_S, Q.IQ2_XS), Mix("IQ2_M", F.MOSTLY_IQ2_M, Q.IQ2_S),
    Mix("IQ3_XXS", F.MOSTLY_IQ3_XXS, Q.IQ3_XXS), Mix("IQ3_XS", F.MOSTLY_IQ3_XS, Q.IQ3_S),
    Mix("IQ3_S", F.MOSTLY_IQ3_S, Q.IQ3_S), Mix("IQ3_M", F.MOSTLY_IQ3_M, Q.IQ3_S),
)}
# i-quant mixes: llama-quantize refuses them without an importance matrix (their IQ1/IQ2/IQ3_XXS tensors need one)
IMATRIX_MIXES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"})
# mixes whose rules take llama.cpp's separate very-low-bit branch (llama_tensor_get_type_impl)
LOW_BIT = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M})

# When a row length (ne[0]) is not a multiple of the block size.
FALLBACK = {Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
            Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
            Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL}

NOT_QUANTIZED_MARKERS = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d")


def parse_override(text: str) -> tuple[re.Pattern[str], Q]:
    """`REGEX=TYPE`, as llama-quantize's --tensor-type takes it."""
    if "=" not in text:
        raise Moeq2ggufError(f"--tensor-type {text!r} must look like REGEX=TYPE, e.g. ffn_down_exps=Q6_K")
    pattern, type_name = text.rsplit("=", 1)
    try:
        qtype = Q[type_name.upper()]
    except KeyError:
        raise Moeq2ggufError(f"--tensor-type {text!r}: {type_name} is not a GGML type; use e.g. Q4_K, Q6_K, Q8_0") from None
    try:
        return re.compile(pattern), qtype
    except re.error as exc:
        raise Moeq2ggufError(f"--tensor-type {text!r}: {pattern!r} is not a valid regular expression ({exc})") from exc


def allows_quantization(name: str, n_dims: int) -> bool:
    return n_dims >= 2 and name.endswith("weight") and not any(m in name for m in NOT_QUANTIZED_MARKERS)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    # fused qkv and MLA's kv_b count as attn_v (llama.cpp's category_is_attn_v is tested first)
    for marker, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                             ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                             ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if marker in name:
            return category
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise Moeq2ggufError(f"cannot find the layer of tensor {name}")
    return int(m.group(1))


def _low_bit_type(cat: str, f: F, t: Q, n_expert: int, n_gqa: int, i_ffn_down: int, n_layer: int) -> Q:
    """llama.cpp's branch for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M (everything but output and token_embd)."""
    wide = f in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
    if cat == "attn_v":
        return Q.Q4_K if n_gqa >= 4 or n_expert >= 4 else (Q.IQ3_S if wide else Q.Q2_K)
    if cat == "attn_k" and n_expert == 8:
        return Q.Q4_K
    if cat == "ffn_down":   # by a count of ffn_down tensors in file order, not by layer (shared experts count too)
        return (Q.IQ3_S if wide else Q.Q2_K) if i_ffn_down < n_layer // 8 else t
    if cat == "attn_output":
        if n_expert == 8:
            return Q.Q5_K
        if f in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return Q.IQ2_XXS
        if wide:
            return Q.IQ3_S
    return t


def _mix_type(name: str, ne0: int, mix: Mix, n_layer: int, n_expert: int, n_gqa: int, i_attn_v: int, n_attn_v: int,
              has_imatrix: bool, tied: bool, i_ffn_down: int = 0) -> Q:
    f, t = mix.ftype, mix.default
    cat = _category(name)
    if cat == "output" or (tied and cat == "token_embd"):
        if ne0 % gguf.GGML_QUANT_SIZES[t][0] != 0:
            return Q.Q8_0
        if f in LOW_BIT or f == F.MOSTLY_IQ3_XXS:
            return Q.Q5_K
        return t if t == Q.Q8_0 else Q.Q6_K
    if cat == "token_embd":
        if f in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
            return Q.Q2_K
        if f in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
            return Q.IQ3_S
        return t
    if f in LOW_BIT:
        return _low_bit_type(cat, f, t, n_expert, n_gqa, i_ffn_down, n_layer)
    if cat == "attn_q":
        return {F.MOSTLY_IQ3_XS: Q.IQ3_XXS, F.MOSTLY_IQ3_XXS: Q.IQ2_S}.get(f, t)
    if cat in ("ffn_gate", "ffn_up"):
        i_layer = _layer_of(name)
        if f == F.MOSTLY_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            return Q.IQ3_XXS
        return t
    if cat == "attn_v":
        if f == F.MOSTLY_Q2_K:
            t = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif f == F.MOSTLY_Q2_K_S and n_gqa >= 4:
            t = Q.Q4_K
        elif f == F.MOSTLY_IQ3_XXS:
            t = Q.Q4_K if n_gqa >= 4 else (Q.IQ3_S if not has_imatrix else Q.IQ3_XXS)
        elif f in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and n_gqa >= 4:
            t = Q.Q4_K
        elif f == F.MOSTLY_IQ3_M:
            t = Q.Q4_K
        elif f == F.MOSTLY_Q3_K_M:
            t = Q.Q5_K if i_attn_v < 2 else Q.Q4_K
        elif f == F.MOSTLY_Q3_K_L:
            t = Q.Q5_K
        elif f in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and n_gqa >= 4:
            t = Q.Q5_K
        elif f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(i_attn_v, n_attn_v):
            t = Q.Q6_K
        elif f == F.MOSTLY_Q4_K_S and i_attn_v < 4:
            t = Q.Q5_K
        if n_expert == 8:
            t = Q.Q8_0
        return t
    if cat == "attn_k":
        if n_expert == 8:
            return Q.Q8_0
        return {F.MOSTLY_IQ3_XS: Q.IQ3_XXS, F.MOSTLY_IQ3_XXS: Q.IQ2_S}.get(f, t)
    if cat == "ffn_down":
        i_layer = _layer_of(name)  # MoE models: from the name (llama.cpp does the same when n_expert > 1)
        if f == F.MOSTLY_Q2_K:
            t = Q.Q3_K
        elif f == F.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                t = Q.Q4_K
        elif f == F.MOSTLY_IQ3_XXS and not has_imatrix:
            t = Q.Q4_K if i_layer < n_layer // 8 else Q.Q3_K
        elif f == F.MOSTLY_Q3_K_M:
            t = Q.Q5_K if i_layer < n_layer // 16 else Q.Q4_K  # llama.cpp keeps Q3_K only for falcon
        elif f == F.MOSTLY_IQ3_M and (i_layer < n_layer // 8 or (n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            t = Q.Q4_K
        elif f == F.MOSTLY_Q3_K_L:
            t = Q.Q5_K
        elif f == F.MOSTLY_Q4_K_M:
            if _use_more_bits(i_layer, n_layer):
                t = Q.Q6_K
        elif i_layer < n_layer // 8 and f in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not has_imatrix:
            t = Q.Q5_K
        elif f == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            t = Q.Q6_K
        elif f == F.MOSTLY_Q4_K_S and i_layer < n_layer // 8:
            t = Q.Q5_K
        elif f in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and has_imatrix and i_layer < n_layer // 8:
            t = Q.Q4_1 if f == F.MOSTLY_Q4_0 else Q.Q5_1
        return t
    if cat == "attn_output":
        if n_expert == 8:
            if f in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
                     F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS):
                t = Q.Q5_K
        elif f == F.MOSTLY_Q2_K:
            t = Q.Q3_K
        elif f == F.MOSTLY_IQ3_XXS:
            t = Q.IQ3_S
        elif f == F.MOSTLY_IQ3_M:
            t = Q.Q4_K
        elif f == F.MOSTLY_Q3_K_M:
            t = Q.Q4_K
        elif f == F.MOSTLY_Q3_K_L:
            t = Q.Q5_K
        return t
    return t


def _fallback(qtype: Q, ne0: int) -> Q:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    return new if ne0 % gguf.GGML_QUANT_SIZES[new][0] == 0 else Q.F16


def assign_types(tensors: Sequence[tuple[str, tuple[int, ...]]], mix_name: str, *, n_layer: int, n_expert: int,
                 n_head: int, n_head_kv: int, has_imatrix: bool = False,
                 overrides: Sequence[tuple[re.Pattern[str], Q]] = (), unquantized: Q = Q.F32) -> list[Q]:
    """GGML type per tensor, in file order. tensors: (GGUF name, torch-order shape) pairs."""
    if mix_name not in MIXES:
        raise Moeq2ggufError(f"type mix {mix_name} is unknown; choose one of {', '.join(MIXES)}")
    mix = MIXES[mix_name]
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_attn_v = sum(_category(n) == "attn_v" for n in names)
    n_gqa = n_head // max(1, n_head_kv)
    out, i_attn_v, i_ffn_down = [], 0, 0
    for name, shape in tensors:
        if not allows_quantization(name, len(shape)):
            out.append(unquantized)
            continue
        ne0 = shape[-1]
        qtype = next((q for pattern, q in overrides if pattern.search(name)), None)
        if qtype is None:  # llama.cpp counts attn_v and ffn_down tensors only where its mix rules run
            qtype = _mix_type(name, ne0, mix, n_layer, n_expert, n_gqa, i_attn_v, n_attn_v, has_imatrix, tied,
                              i_ffn_down)
            i_attn_v += _category(name) == "attn_v"
            i_ffn_down += _category(name) == "ffn_down"
        out.append(_fallback(qtype, ne0))
    return out
