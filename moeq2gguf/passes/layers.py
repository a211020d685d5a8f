"""The layer loop, written once: a model's tensors grouped as the GGUF orders them (token_embd, the decoder
blocks, then the rest), a block's weights as the calibration forward takes them, and one block run over the
calibration windows in chunks."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moeq2gguf import nn
from moeq2gguf.models.base import ModelSpec, TensorSource

EMBEDDING = "token_embd.weight"


@dataclass(frozen=True)
class Layers:
    """The sources of a model in file order: embedding, blocks[bid], tail (output_norm, output, ...)."""
    embedding: TensorSource
    blocks: tuple[tuple[TensorSource, ...], ...]
    tail: tuple[TensorSource, ...]

    @classmethod
    def of(cls, sources: list[TensorSource], n_layers: int) -> "Layers":
        by_layer: dict[int | None, list[TensorSource]] = {}
        for s in sources:
            by_layer.setdefault(s.layer, []).append(s)
        outside = by_layer.get(None, [])
        head = [s for s in outside if s.name == EMBEDDING]
        tail = [s for s in outside if s.name != EMBEDDING]
        blocks = tuple(tuple(by_layer.get(b, ())) for b in range(n_layers))
        order = [s.name for s in head] + [s.name for b in blocks for s in b] + [s.name for s in tail]
        assert len(head) == 1 and order == [s.name for s in sources], "sources are not in GGUF file order"
        return cls(head[0], blocks, tuple(tail))

    def __iter__(self) -> Iterator[tuple[int, tuple[TensorSource, ...]]]:
        return iter(enumerate(self.blocks))

    def tail_weights(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {s.name: s.load().reshape(s.shape).to(device) for s in self.tail}


def block_key(name: str) -> str:
    """blk.3.ffn_up_exps.weight -> ffn_up_exps.weight: the key of a block's weights dict"""
    return name.split(".", 2)[2]


def short_name(name: str) -> str:
    """blk.3.ffn_up_exps.weight -> ffn_up_exps; output.weight -> output"""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def input_of(name: str) -> str | None:
    """The calibration input a weight reads (nn.INPUT_OF), None for tensors no statistics describe."""
    return nn.INPUT_OF.get(short_name(name))


def block_weights(sources: tuple[TensorSource, ...] | list[TensorSource],
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {block_key(s.name): s.load().reshape(s.shape).to(device) for s in sources}


def run_block(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, observer: nn.Observer | None, bid: int,
              batch: int, routes: list[nn.Routing] | None = None) -> torch.Tensor:
    """One decoder block over windows x [N, L, n_embd], `batch` windows at a time; routes: appended with each
    chunk's expert choice (a MoE block)."""
    out = []
    with torch.no_grad():
        for chunk in x.split(batch):
            y, routing = nn.decoder_layer(chunk, w, spec, observer, bid=bid)
            out.append(y)
            if routes is not None and routing is not None:
                routes.append(routing)
    return torch.cat(out)


class FanOut:
    """An nn.Observer that passes every observation to several observers (the plug-ins of one pass)."""

    def __init__(self, observers: list[nn.Observer]):
        self.observers = observers

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        for o in self.observers:
            o.observe(name, x, token_weight, expert)


def fan_out(observers: list[nn.Observer | None]) -> nn.Observer | None:
    present = [o for o in observers if o is not None]
    return None if not present else present[0] if len(present) == 1 else FanOut(present)
