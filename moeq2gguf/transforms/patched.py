"""Transforms whose files need the patched llama.cpp (runtime_patches/): per-expert input smoothing and
the expert Hadamard, applied to the TensorSource list after the residual rotation (which they compose with:
smoothing is measured on the rotated model, the Hadamard acts inside the experts)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import FamilyAdapter, TensorSource
from moeq2gguf.transforms import expert_hadamard, expert_smoothing

SMOOTHING = ("per-expert",)


@dataclass(frozen=True)
class ExpertTransforms:
    smooth: str | None = None          # per-expert
    hadamard: bool = False
    alpha: float = expert_smoothing.ALPHA
    hadamard_max_block: int | None = None

    def __post_init__(self) -> None:
        if self.smooth is not None and self.smooth not in SMOOTHING:
            raise Moeq2ggufError(f"--smooth {self.smooth} is unknown here; choose one of {', '.join(SMOOTHING)}")

    @property
    def active(self) -> bool:
        return self.smooth is not None or self.hadamard


def apply(adapter: FamilyAdapter, sources: list[TensorSource], transforms: ExpertTransforms, calib: str,
          n_windows: int, ctx: int, device: str = "cpu") -> tuple[list[TensorSource], Callable[[gguf.GGUFWriter], None]]:
    """The transformed sources, and a function that writes the GGUF keys announcing them."""
    spec, steps = adapter.spec, []
    if transforms.smooth == "per-expert":
        from moeq2gguf.calib_data import calibration_windows
        windows = calibration_windows(adapter.reader.model_dir, calib, n_windows, ctx)
        stats = expert_smoothing.expert_input_absmax(sources, spec, windows, device=device)
        sources = expert_smoothing.smooth_sources(sources, spec, stats, transforms.alpha)
        steps.append(lambda w: expert_smoothing.add_metadata(w, spec.gguf_arch))
    if transforms.hadamard:
        block = expert_hadamard.hadamard_block(spec.expert_width, transforms.hadamard_max_block)
        sources = expert_hadamard.expert_hadamard_sources(sources, spec, block)
        steps.append(lambda w: expert_hadamard.add_metadata(w, spec.gguf_arch, block))

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        for step in steps:
            step(writer)
    return sources, add_metadata
