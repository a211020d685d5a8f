"""The one float calibration pass: the calibration windows run once through the float model (rotated, if it is),
one decoder block resident at a time, and every consumer of activations is a plug-in of that pass: smoothing
scales (transforms/smoothing.py, transforms/expert_smoothing.py), the size allocator's sensitivity
(quant/sensitivity.py). The quantization pass (passes/quantize.py) is separate: it runs on the quantized model's
activations, after the file's types are known.

Per block, each plug-in may give an observer for the block's forward; after the forward, each plug-in sees the
block as a `BlockView`, in order: a transform plug-in (smoothing) replaces the view's weights with the
transformed ones and records how the inputs of the quantized linears scale (`input_scales`), so the plug-ins
after it measure the transformed block without a second forward: the forward ran the untransformed block, whose
outputs equal the transformed one's in float.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeq2gguf import nn
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec
from moeq2gguf.passes.layers import Layers, block_weights, fan_out, run_block
from moeq2gguf.profile import stage


@dataclass
class BlockView:
    """One block after its float forward, as the plug-ins hand it on."""
    bid: int
    weights: dict[str, torch.Tensor]     # keys without blk.N.; transformed by the transform plug-ins so far
    # per calibration input (nn.INPUT_OF's names): r [G or 1, K], the transformed block's input is x * r
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)


class Plugin:
    """A consumer of the float pass; override what it needs."""

    def embedding(self, token_embd: torch.Tensor, windows: torch.Tensor) -> None:
        """The embedding's weights and the windows [N, L], before the first block."""

    def observer(self, bid: int, weights: dict[str, torch.Tensor]) -> nn.Observer | None:
        """The observer of block bid's forward (None: nothing to observe there)."""
        return None

    def after_block(self, view: BlockView) -> None:
        """The block after its forward: measure it, or (a transform) replace view.weights / add view.input_scales."""

    def head(self, x: torch.Tensor, tail: dict[str, torch.Tensor]) -> None:
        """The final hidden states [N, L, n_embd] and the tail's weights (output_norm, output)."""


def float_pass(layers: Layers, spec: ModelSpec, windows: torch.Tensor, plugins: list[Plugin], purpose: str,
               device: torch.device | str = "cpu", batch: int = 8,
               progress: Callable[[int], None] | None = None) -> None:
    """Run the windows [N, L] through the float model once, feeding every plug-in. purpose names the options
    that need the pass, for the error when the calibration forward cannot run the family."""
    reason = nn.unsupported_reason(spec)
    if reason:
        raise Moeq2ggufError(f"{purpose} needs the calibration forward, which cannot run {spec.family} ({reason})")
    device = torch.device(device)
    token_embd = layers.embedding.load().reshape(layers.embedding.shape)
    for p in plugins:
        p.embedding(token_embd, windows)
    x = nn.embed(windows, token_embd.to(device))
    del token_embd
    for bid, block in layers:
        with stage("read", bid):
            w = block_weights(block, device)
        with stage("float forward", bid):
            x_next = run_block(x, w, spec, fan_out([p.observer(bid, w) for p in plugins]), bid, batch)
        view = BlockView(bid, w)
        with stage("plug-ins", bid):
            for p in plugins:
                p.after_block(view)
        x = x_next
        del w, view
        if progress:
            progress(bid)
    tail = layers.tail_weights(device)
    for p in plugins:
        p.head(x, tail)
