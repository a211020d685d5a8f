"""Offline residual-stream rotation (QuaRot's, docs/METHODS.md section 7), folded into the weights.

With the residual stream h (a row of n_embd) replaced by h Q for an orthogonal Q, RMSNorm commutes
with the rotation once its weight g is folded into the linears that read its output
(rms(h Q) = rms(h), and (h/rms * g) W^T = (h/rms) (W diag(g))^T), so in GGUF orientation
(W [out, n_embd] for readers, [n_embd, in] for writers):
  - token_embd E            -> E Q
  - readers of a norm's output (q/k/v, MLA's q / q_a / kv_a_mqa, router, shared-expert gate,
    shared and routed gate/up, dense gate/up, output head)   W -> W diag(g) Q
  - the norms feeding them (attn_norm, the FFN input norm, output_norm)   g -> ones
  - writers to the residual (attn_output, ffn_down, ffn_down_shexp, ffn_down_exps) W -> Q^T W,
    and their biases b -> b Q (GPT-OSS attn_output.bias, ffn_down_exps.bias)
and every output of the model is unchanged in exact arithmetic. Untouched: norms that act after a
projection (Qwen3-MoE / OLMoE q/k norms, DeepSeek-V2's attn_q_a_norm / attn_kv_a_norm on the LoRA
latents), MLA's q_b / k_b / v_b, attention sinks, reader biases (added after the matmul), the
router's bias and DeepSeek-V3's selection bias.

Q is seeded: diag(random signs) H / sqrt(n) when n_embd = 2^k * m has a Hadamard matrix here
(hadamard.py), applied with the fast transform; otherwise a random orthogonal matrix (QR of a
Gaussian, signs fixed by diag(R) > 0). The transform is lazy: each new TensorSource loads its own
tensor and at most one norm vector, so conversion memory stays one tensor at a time. Rotated
MXFP4 experts (GPT-OSS) are new values, so they lose their raw blocks and are re-encoded in the
requested type.

A tied checkpoint (no output.weight) gets an output head of its own, E diag(g_out) Q, since the
rotated token_embd (E Q) lacks the output norm's weight.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import torch

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec, TensorSource
from moeq2gguf.nn.hadamard import hadamard_factors, hadamard_transform

log = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
ROTATIONS = ("hadamard", "orthogonal")


def _names(*tensors: gguf.MODEL_TENSOR) -> frozenset[str]:
    """GGUF names without blk.N. and suffix: T.ATTN_Q -> attn_q"""
    return frozenset(gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in tensors)


ATTN_NORM = "attn_norm"
# The norm whose output feeds the FFN: ffn_norm, except GPT-OSS and GLM-4.5, whose post_attention_layernorm
# is written as post_attention_norm (their llama.cpp graphs norm the FFN input with it).
FFN_NORM = {gguf.MODEL_ARCH_NAMES[arch]: "post_attention_norm"
            for arch in (gguf.MODEL_ARCH.GPT_OSS, gguf.MODEL_ARCH.GLM4_MOE, gguf.MODEL_ARCH.QWEN35MOE)}
# (qwen35moe's linear attention reads the normed stream with attn_qkv, attn_gate, ssm_alpha, ssm_beta and writes with ssm_out)
READS_ATTN_NORM = _names(T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_QKV, T.ATTN_Q_A, T.ATTN_KV_A_MQA, T.ATTN_GATE,
                         T.SSM_ALPHA, T.SSM_BETA)
READS_FFN_NORM = _names(T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_GATE_UP_EXP,
                        T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_GATE, T.FFN_UP)
WRITES = _names(T.ATTN_OUT, T.FFN_DOWN_EXP, T.FFN_DOWN_SHEXP, T.FFN_DOWN, T.SSM_OUT)
UNTOUCHED = _names(T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_Q_A_NORM, T.ATTN_KV_A_NORM, T.ATTN_Q_B, T.ATTN_K_B,
                   T.ATTN_V_B, T.ATTN_KV_B, T.ATTN_SINKS, T.FFN_EXP_PROBS_B, T.SSM_CONV1D, T.SSM_A, T.SSM_DT, T.SSM_NORM)
GLOBAL_UNTOUCHED = _names(T.ROPE_FREQS)   # llama4's llama3 RoPE factors
assert _names(T.ATTN_NORM, T.FFN_NORM, T.ATTN_POST_NORM) == {ATTN_NORM, "ffn_norm", *FFN_NORM.values()}
CHUNK_ELEMENTS = 1 << 22   # rows rotated at a time, in float64 (32 MiB)


@dataclass(frozen=True)
class Rotation:
    """An orthogonal Q [n, n]; apply(x) = x @ Q over x's last axis."""
    kind: str      # hadamard: diag(signs) H / sqrt(n) | orthogonal: QR of a Gaussian
    seed: int
    n: int
    _signs: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _matrix: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n] -> x @ Q, computed in float64 chunks of rows, returned in x's dtype."""
        assert x.shape[-1] == self.n, f"rotating a last axis of {x.shape[-1]} with a rotation of order {self.n}"
        rows = x.reshape(-1, self.n)
        out = torch.empty(rows.shape, dtype=x.dtype)
        step = max(1, CHUNK_ELEMENTS // self.n)
        for i in range(0, rows.shape[0], step):
            chunk = rows[i:i + step].to(torch.float64)
            if self.kind == "hadamard":
                chunk = hadamard_transform(chunk * self._signs) / math.sqrt(self.n)
            else:
                chunk = chunk @ self._matrix
            out[i:i + step] = chunk
        return out.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """Q itself (float64), for tests."""
        return self.apply(torch.eye(self.n, dtype=torch.float64))


def check_seed(seed: object) -> int:
    """The seed as an int, or a Moeq2ggufError naming the rule."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise Moeq2ggufError(f"rotation seed {seed!r} is a {type(seed).__name__}; give a non-negative integer such as 0")
    if not 0 <= int(seed) < 2**63:
        raise Moeq2ggufError(f"rotation seed {seed} is out of range; give an integer in [0, 2^63)")
    return int(seed)


def random_rotation(n: int, seed: int = 0, kind: str | None = None) -> Rotation:
    """A seeded orthogonal Q of order n: randomized Hadamard where n allows (kind None or
    "hadamard"), else (or with kind "orthogonal") a random orthogonal matrix."""
    seed = check_seed(seed)
    if kind is None:
        kind = "hadamard" if hadamard_factors(n) else "orthogonal"
    if kind not in ROTATIONS:
        raise Moeq2ggufError(f"rotation {kind!r} is unknown; choose one of {', '.join(ROTATIONS)}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        if hadamard_factors(n) is None:
            raise Moeq2ggufError(f"no Hadamard matrix of order {n} here (n_embd must be 2^k times 1, 12, 20, 28, 36, "
                                 "40, 52 or 60); use the orthogonal rotation")
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        return Rotation(kind, seed, n, _signs=signs)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Rotation(kind, seed, n, _matrix=q * torch.sign(torch.diagonal(r)))


def _split(name: str) -> tuple[int | None, str, str]:
    """blk.3.ffn_up_exps.weight -> (3, ffn_up_exps, weight); output.weight -> (None, output, weight)."""
    parts = name.split(".")
    if parts[-1] not in ("weight", "bias"):   # qwen35moe's blk.N.ssm_a has no suffix
        parts.append("")
    if parts[0] == "blk":
        return int(parts[1]), ".".join(parts[2:-1]), parts[-1]
    return None, ".".join(parts[:-1]), parts[-1]


def _replace(source: TensorSource, load: Callable[[], torch.Tensor]) -> TensorSource:
    # new values: any raw GGML blocks the checkpoint held (MXFP4) no longer describe them
    return dataclasses.replace(source, load=load, raw_qtype=None, load_raw=None)


def rotate_sources(sources: list[TensorSource], spec: ModelSpec, rotation: Rotation) -> list[TensorSource]:
    """The same GGUF tensors (plus output.weight for a tied model), loading rotated values."""
    n = spec.hidden_size
    if rotation.n != n:
        raise Moeq2ggufError(f"rotation of order {rotation.n} does not fit n_embd {n}")
    by_name = {s.name: s for s in sources}
    ffn_norm = FFN_NORM.get(spec.gguf_arch, "ffn_norm")
    norms = {ATTN_NORM, ffn_norm}

    def norm_of(bid: int | None, norm: str, reader: str) -> TensorSource:
        name = f"blk.{bid}.{norm}.weight" if bid is not None else f"{norm}.weight"
        if name not in by_name:
            raise Moeq2ggufError(f"cannot rotate {reader}: the norm it reads, {name}, is not in the {spec.gguf_arch} file")
        return by_name[name]

    def reader(source: TensorSource, norm: TensorSource) -> TensorSource:
        assert source.shape[-1] == n, f"{source.name} {source.shape} does not read n_embd {n}"

        def load() -> torch.Tensor:
            g = norm.load().reshape(n).to(torch.float32)
            return rotation.apply(source.load().reshape(source.shape) * g)
        return _replace(source, load)

    def writer(source: TensorSource) -> TensorSource:
        # weights [..., n_embd, in]: Q^T W, i.e. each column (x) rotated as x @ Q; biases [..., n_embd]: b Q
        if source.name.endswith(".bias"):
            assert source.shape[-1] == n, f"{source.name} {source.shape} is not over n_embd {n}"
            return _replace(source, lambda: rotation.apply(source.load().reshape(source.shape)))
        assert source.shape[-2] == n, f"{source.name} {source.shape} does not write n_embd {n}"

        def load() -> torch.Tensor:
            w = source.load().reshape(source.shape)
            if w.dim() == 2:
                return rotation.apply(w.T).T.contiguous()
            out = torch.empty_like(w)
            for e in range(w.shape[0]):   # one expert at a time: the transposed copy stays one expert's size
                out[e] = rotation.apply(w[e].T).T
            return out
        return _replace(source, load)

    def ones(source: TensorSource) -> TensorSource:
        return _replace(source, lambda: torch.ones(source.shape, dtype=torch.float32))

    out = []
    for s in sources:
        bid, base, suffix = _split(s.name)
        if base == "token_embd" and suffix == "weight":
            out.append(_replace(s, lambda s=s: rotation.apply(s.load().reshape(s.shape))))
        elif base == "output" and suffix == "weight":
            out.append(reader(s, norm_of(None, "output_norm", s.name)))
        elif suffix == "weight" and (base == "output_norm" and bid is None or bid is not None and base in norms):
            out.append(ones(s))
        elif bid is not None and base in WRITES:
            out.append(writer(s))
        elif bid is not None and suffix == "bias" and (base in READS_ATTN_NORM | READS_FFN_NORM):
            out.append(s)   # added after the matmul, in the output space
        elif bid is not None and base in READS_ATTN_NORM:
            out.append(reader(s, norm_of(bid, ATTN_NORM, s.name)))
        elif bid is not None and base in READS_FFN_NORM:
            out.append(reader(s, norm_of(bid, ffn_norm, s.name)))
        elif bid is not None and base in UNTOUCHED or bid is None and base in GLOBAL_UNTOUCHED:
            out.append(s)
        else:
            raise Moeq2ggufError(f"--rotate does not know how {s.name} of the {spec.gguf_arch} architecture touches the "
                                 "residual stream; convert without --rotate")
    if "output.weight" not in by_name:
        embd, norm = by_name["token_embd.weight"], norm_of(None, "output_norm", "output.weight")
        head = TensorSource("output.weight", embd.shape, "output", embd.load, None, ())
        out.append(reader(head, norm))
    log.info("rotating the residual stream: %s Q of order %d, seed %d", rotation.kind, n, rotation.seed)
    return out
