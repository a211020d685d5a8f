"""The adapter interface every MoE family implements, and the ModelSpec it produces.

An adapter maps one Hugging Face family (config.json keys, on-disk tensor names in both the
per-expert and the fused expert layouts) onto llama.cpp's GGUF architecture: metadata keys and
tensor names. It does no math beyond reshapes (stacking experts, splitting fused gate/up,
llama's q/k permutation). Everything downstream reads the ModelSpec, never config.json.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import gguf
import torch

from moeq2gguf.errors import CheckpointError, Moeq2ggufError
from moeq2gguf.io.checkpoint import IGNORED_SUFFIXES, CheckpointReader

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Routing:
    """How the router's logits become expert weights, as llama.cpp will execute them."""
    scoring: str = "softmax"          # softmax | sigmoid
    renormalize: bool = False         # renormalise the top-k weights to sum to 1
    scale: float = 1.0                # routed_scaling_factor


@dataclass(frozen=True)
class ModelSpec:
    family: str
    hf_architecture: str
    gguf_arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    n_experts: int
    n_experts_used: int
    expert_width: int
    routing: Routing
    shared_expert_width: int = 0
    shared_expert_gated: bool = False
    dense_width: int = 0
    attention_bias: bool = False
    tie_embeddings: bool = False
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_experts <= 0 or not 0 < self.n_experts_used <= self.n_experts:
            raise Moeq2ggufError(
                f"expert counts {self.n_experts_used} of {self.n_experts} are invalid; config.json must give "
                "a positive expert count and 0 < experts per token <= experts")


@dataclass
class TensorSource:
    """One GGUF tensor and how to produce it from the checkpoint (float32, torch order)."""
    name: str
    shape: tuple[int, ...]
    role: str                        # embedding | output | attention | router | expert | shared | norm | bias
    load: Callable[[], torch.Tensor]
    layer: int | None = None
    inputs: tuple[str, ...] = ()     # the checkpoint tensors it is made from


def config_value(config: dict, *keys: str, default=None, required: bool = True):
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is not None or not required:
        return default
    raise CheckpointError(f"config.json lacks '{keys[0]}', which this architecture needs; the checkpoint's config is incomplete")


def rope_theta_of(config: dict, default: float = 10000.0) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise Moeq2ggufError(f"rope type {params['rope_type']!r} is not supported yet; only default RoPE is")
    return float(params.get("rope_theta", config.get("rope_theta", default)))


class FamilyAdapter:
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    family: ClassVar[str]
    default_pre_tokenizer: ClassVar[str] = "default"

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.config = reader.config
        self.spec = self.make_spec(self.config)

    # --- what a family implements ------------------------------------------------------------
    def make_spec(self, config: dict) -> ModelSpec:
        raise NotImplementedError

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        raise NotImplementedError

    # --- shared pieces -----------------------------------------------------------------------
    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @staticmethod
    def gguf_name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        base = gguf.TENSOR_NAMES[tensor].format(bid=bid)
        return f"{base}.{suffix}" if suffix else base

    def add_common_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        writer.add_context_length(s.context_length)
        writer.add_embedding_length(s.hidden_size)
        writer.add_block_count(s.n_layers)
        writer.add_head_count(s.n_heads)
        writer.add_head_count_kv(s.n_kv_heads)
        writer.add_rope_freq_base(s.rope_theta)
        writer.add_rope_dimension_count(s.head_dim)
        writer.add_layer_norm_rms_eps(s.rms_norm_eps)
        writer.add_expert_count(s.n_experts)
        writer.add_expert_used_count(s.n_experts_used)
        writer.add_vocab_size(s.vocab_size)
        if s.head_dim * s.n_heads != s.hidden_size:
            writer.add_key_length(s.head_dim)
            writer.add_value_length(s.head_dim)

    def tensor(self, hf_name: str, tensor: gguf.MODEL_TENSOR, role: str, bid: int | None = None,
               suffix: str = "weight", transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TensorSource:
        if not self.reader.has(hf_name):
            raise CheckpointError(f"tensor {hf_name} is missing from {self.reader.model_dir}; the checkpoint is incomplete")

        def load() -> torch.Tensor:
            t = self.reader.get(hf_name)
            return transform(t) if transform else t

        shape = self.reader.shape(hf_name)
        if shape and shape[0] == 1 and len(shape) == 2 and role == "router":
            shape = shape[1:]  # [1, n_embd] gates are 1-D in GGUF
        return TensorSource(self.gguf_name(tensor, bid, suffix), shape, role, load, bid, (hf_name,))

    def stacked_experts(self, bid: int, per_expert: dict[gguf.MODEL_TENSOR, str], fused_gate_up: str | None,
                        fused_down: str | None) -> list[TensorSource]:
        """Routed experts as three [E, out, in] tensors, from either on-disk layout.

        per_expert maps ffn_{gate,up,down}_exps to a name with {e} for the expert index.
        Fused layout: gate_up [E, 2*ff, in] (gate rows first) and down [E, out, ff]."""
        n_expert = self.spec.n_experts
        first = {k: v.format(e=0) for k, v in per_expert.items()}
        if all(self.reader.has(n) for n in first.values()):
            sources = []
            for kind, pattern in per_expert.items():
                names = [pattern.format(e=e) for e in range(n_expert)]
                missing = [n for n in names if not self.reader.has(n)]
                if missing:
                    raise CheckpointError(f"expert tensor {missing[0]} is missing ({len(missing)} of {n_expert} experts absent); the checkpoint is incomplete")
                shape = (n_expert, *self.reader.shape(names[0]))

                def load(names=names) -> torch.Tensor:
                    return torch.stack([self.reader.get(n) for n in names])

                sources.append(TensorSource(self.gguf_name(kind, bid), shape, "expert", load, bid, tuple(names)))
            return sources
        if fused_gate_up and self.reader.has(fused_gate_up) and fused_down and self.reader.has(fused_down):
            e, two_ff, n_in = self.reader.shape(fused_gate_up)
            ff = two_ff // 2

            def gate() -> torch.Tensor:
                return self.reader.get(fused_gate_up)[:, :ff].contiguous()

            def up() -> torch.Tensor:
                return self.reader.get(fused_gate_up)[:, ff:].contiguous()

            return [
                TensorSource(self.gguf_name(T.FFN_GATE_EXP, bid), (e, ff, n_in), "expert", gate, bid, (fused_gate_up,)),
                TensorSource(self.gguf_name(T.FFN_UP_EXP, bid), (e, ff, n_in), "expert", up, bid, (fused_gate_up,)),
                TensorSource(self.gguf_name(T.FFN_DOWN_EXP, bid), self.reader.shape(fused_down), "expert",
                             lambda: self.reader.get(fused_down), bid, (fused_down,)),
            ]
        raise CheckpointError(
            f"layer {bid} has no routed expert tensors (looked for {first[T.FFN_GATE_EXP]} and {fused_gate_up}); "
            "the checkpoint is incomplete or not of this family")

    def head_tensors(self) -> list[TensorSource]:
        return [self.tensor("model.embed_tokens.weight", T.TOKEN_EMBD, "embedding")]

    def tail_tensors(self) -> list[TensorSource]:
        out = [self.tensor("model.norm.weight", T.OUTPUT_NORM, "norm")]
        if self.reader.has("lm_head.weight"):
            out.append(self.tensor("lm_head.weight", T.OUTPUT, "output"))
        elif not self.spec.tie_embeddings:
            raise CheckpointError("lm_head.weight is missing and tie_word_embeddings is false; the checkpoint is incomplete")
        return out

    def all_tensors(self) -> list[TensorSource]:
        """Every GGUF tensor in file order: embeddings, layers 0..n-1, final norm and head."""
        sources = self.head_tensors()
        for bid in range(self.spec.n_layers):
            sources.extend(self.layer_tensors(bid))
        sources.extend(self.tail_tensors())
        return sources

    def check_all_used(self, sources: list[TensorSource]) -> None:
        """Leftover checkpoint tensors mean the adapter misread the family: refuse rather than drop weights."""
        used = {name for s in sources for name in s.inputs}
        if self.spec.tie_embeddings:
            used.add("lm_head.weight")
        leftover = [n for n in self.reader.names() if n not in used and not n.endswith(IGNORED_SUFFIXES)]
        if leftover:
            raise CheckpointError(
                f"{len(leftover)} checkpoint tensors have no place in the {self.arch_name} GGUF (first: {leftover[0]}); "
                f"the checkpoint does not match the {self.family} layout this converter knows")
