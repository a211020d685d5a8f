"""Transforms whose files need the patched llama.cpp (runtime_patches/): per-expert input smoothing and
the expert Hadamard, applied to the TensorSource list after the residual rotation (which they compose with:
smoothing is measured on the rotated model, the Hadamard acts inside the experts)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from moeq2gguf import nn
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec, TensorSource
from moeq2gguf.transforms import expert_hadamard, expert_smoothing

SMOOTHING = ("per-expert",)


@dataclass(frozen=True)
class ExpertTransforms:
    smooth: str | None = None          # per-expert
    hadamard: bool = False
    alpha: float = expert_smoothing.ALPHA
    hadamard_max_block: int | None = expert_hadamard.MAX_BLOCK

    def __post_init__(self) -> None:
        if self.smooth is not None and self.smooth not in SMOOTHING:
            raise Moeq2ggufError(f"--smooth {self.smooth} is unknown here; choose one of {', '.join(SMOOTHING)}")

    @property
    def active(self) -> bool:
        return self.smooth is not None or self.hadamard


def apply(sources: list[TensorSource], spec: ModelSpec, transforms: ExpertTransforms,
          stats: dict[int, expert_smoothing.ExpertAbsMax] | None = None
          ) -> tuple[list[TensorSource], ModelSpec, Callable[[gguf.GGUFWriter], None]]:
    """The transformed sources, the spec the calibration forward must run them with (the expert Hadamard is part
    of the patched runtime's graph), and a function that writes the GGUF keys announcing them. stats: the
    per-expert input maxima of a float pass (expert_smoothing.ExpertInputMaxima), for --smooth per-expert."""
    steps, before, spec_before = [], sources, spec
    if transforms.smooth == "per-expert":
        if stats is None:
            raise AssertionError("--smooth per-expert needs the float pass's expert input maxima")
        sources = expert_smoothing.smooth_sources(sources, spec, stats, transforms.alpha)
        steps.append(lambda w: expert_smoothing.add_metadata(w, spec_before.gguf_arch))
    if transforms.hadamard:
        block = expert_hadamard.hadamard_block(spec.expert_width, transforms.hadamard_max_block)
        sources = expert_hadamard.expert_hadamard_sources(sources, spec, block)
        steps.append(lambda w: expert_hadamard.add_metadata(w, spec_before.gguf_arch, block))
        # the model is now the patched runtime's graph: the calibration forward (nn.moe) rotates h as it does
        spec = dataclasses.replace(spec, expert_hadamard_block=block)

    check_forward(spec_before, spec, before, sources)

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        for step in steps:
            step(writer)
    return sources, spec, add_metadata


def check_forward(spec_before: ModelSpec, spec_after: ModelSpec, before: list[TensorSource],
                  after: list[TensorSource], n_tokens: int = 32, tol: float = 1e-4) -> None:
    """The calibration forward (nn) must run the transformed model as the patched llama.cpp does, or the
    quantizers' statistics and the layer-by-layer inputs would be of another function: one MoE layer, transformed
    and not, on the same input."""
    bid = next((s.layer for s in before if s.name.endswith(".ffn_gate_inp.weight")), None)
    if bid is None:
        raise Moeq2ggufError("--smooth per-expert / --expert-hadamard: the model has no routed experts")

    def layer(sources: list[TensorSource]) -> dict[str, torch.Tensor]:
        return {s.name.split(".", 2)[2]: s.load().reshape(s.shape).to(torch.float32) for s in sources if s.layer == bid}

    x = torch.randn(1, n_tokens, spec_before.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = nn.decoder_layer(x, layer(before), spec_before, bid=bid)[0]
        got = nn.decoder_layer(x, layer(after), spec_after, bid=bid)[0]
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= tol:
        raise Moeq2ggufError(f"the calibration forward does not run layer {bid} with the expert transforms as the patched "
                             f"llama.cpp does (relative difference {err:.2e}); this version cannot convert with them")
