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


@dataclass
class PatchedModel:
    """The model as the patched runtime runs it, prepared before the float pass (see prepare)."""
    sources: list[TensorSource]       # what the file holds; smoothed values read `maxima` when loaded
    pass_sources: list[TensorSource]  # what the float pass runs: with the Hadamard, without the smoothing it measures
    spec: ModelSpec                   # the runtime's graph (the expert Hadamard is part of it) for every forward
    maxima: expert_smoothing.ExpertInputMaxima | None   # the float pass's plug-in (--smooth per-expert)
    _before: tuple[list[TensorSource], ModelSpec]
    _steps: list[Callable[[gguf.GGUFWriter], None]]

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        """The GGUF keys announcing the transforms (known before the pass: a size budget counts them)."""
        for step in self._steps:
            step(writer)

    def check(self) -> None:
        """After the float pass: the calibration forward runs the transformed model as the patched runtime does."""
        check_forward(self._before[1], self.spec, self._before[0], self.sources)


def prepare(sources: list[TensorSource], spec: ModelSpec, transforms: ExpertTransforms,
            transform_blocks: bool = False) -> PatchedModel:
    """The transformed sources and the spec every later forward runs them with. The expert Hadamard needs no
    statistics, so the float pass already runs the rotated experts (its plug-ins measure the file's model); per-expert
    smoothing needs the pass's maxima, so its sources read them when loaded, and `maxima` is the plug-in that
    collects them (transform_blocks: and smooths each block in the pass, for the size allocator's sensitivity)."""
    before, spec_before = sources, spec
    smooth_step = hadamard_step = None
    if transforms.hadamard:
        block = expert_hadamard.hadamard_block(spec.expert_width, transforms.hadamard_max_block)
        sources = expert_hadamard.expert_hadamard_sources(sources, spec, block)
        hadamard_step = lambda w: expert_hadamard.add_metadata(w, spec_before.gguf_arch, block)  # noqa: E731
        spec = dataclasses.replace(spec, expert_hadamard_block=block)
    pass_sources, maxima = sources, None
    if transforms.smooth == "per-expert":
        maxima = expert_smoothing.ExpertInputMaxima(spec, transforms.alpha, transform_blocks)
        sources = expert_smoothing.smooth_sources(sources, spec, maxima.stats, transforms.alpha)
        smooth_step = lambda w: expert_smoothing.add_metadata(w, spec_before.gguf_arch)  # noqa: E731
    # the keys in the order the files have always had them: smoothing, then the Hadamard
    steps = [step for step in (smooth_step, hadamard_step) if step is not None]
    return PatchedModel(sources, pass_sources, spec, maxima, (before, spec_before), steps)


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
