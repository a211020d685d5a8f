"""Routing agreement, torch side (docs/METHODS.md section 6): for each MoE layer, the share of tokens
whose top-k expert set is the same in the quantized model (its GGUF dequantized with gguf-py) as in
the float checkpoint. Each model runs on its own hidden states, as each would at inference."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import torch

from moeq2gguf import nn
from moeq2gguf.calib.sources import calibration_windows
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.registry import open_model
from moeq2gguf.passes.layers import Layers, block_key, block_weights, run_block


def _gguf_tensors(path: Path) -> dict[str, object]:
    """The GGUF's tensors by name, memory-mapped (nothing dequantized yet)."""
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _dequantize(t) -> torch.Tensor:
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())


def routing_agreement(quant: str | os.PathLike[str], model_dir: str | os.PathLike[str], text: str = "eval",
                      windows: int = 4, ctx: int = 512, batch: int = 8) -> list[float]:
    """Per MoE layer (dense leading layers have no routing), % of tokens whose selected expert set is
    unchanged by quantization. One float block and one dequantized block resident at a time."""
    adapter = open_model(model_dir)
    spec = adapter.spec
    reason = nn.unsupported_reason(spec)
    if reason:
        raise Moeq2ggufError(f"routing agreement needs the calibration forward ({reason})")
    sources = adapter.all_tensors()
    quant_w = _gguf_tensors(Path(quant))
    if set(quant_w) != {s.name for s in sources}:
        raise Moeq2ggufError(f"{quant} does not hold the tensors of {model_dir}; pass the checkpoint it was made from")
    layers = Layers.of(sources, spec.n_layers)
    tokens = calibration_windows(model_dir, text, windows, ctx)
    xs = [nn.embed(tokens, layers.embedding.load().reshape(layers.embedding.shape)),
          nn.embed(tokens, _dequantize(quant_w["token_embd.weight"]))]
    agree = []
    for bid, block in layers:
        routes: tuple[list, list] = ([], [])
        blocks = (block_weights(block), {block_key(s.name): _dequantize(quant_w[s.name]) for s in block})
        for i, w in enumerate(blocks):
            xs[i] = run_block(xs[i], w, spec, None, bid, batch, routes[i])
        if routes[0]:
            chosen = [torch.cat([r.experts for r in rs]).sort(-1).values for rs in routes]
            agree.append(100.0 * float((chosen[0] == chosen[1]).all(-1).float().mean()))
    return agree
