"""Routing agreement, torch side (ALGORITHMS.md section 6): for each MoE layer, the share of tokens
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


def _gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        weights[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
    return weights


def routing_agreement(quant: str | os.PathLike[str], model_dir: str | os.PathLike[str], text: str = "eval",
                      windows: int = 4, ctx: int = 512) -> list[float]:
    """Per MoE layer (dense leading layers have no routing), % of tokens whose selected expert set is
    unchanged by quantization."""
    adapter = open_model(model_dir)
    spec = adapter.spec
    reason = nn.unsupported_reason(spec)
    if reason:
        raise Moeq2ggufError(f"routing agreement needs the calibration forward ({reason})")
    float_w = {s.name: s.load().reshape(s.shape) for s in adapter.all_tensors()}
    quant_w = _gguf_weights(Path(quant))
    if set(quant_w) != set(float_w):
        raise Moeq2ggufError(f"{quant} does not hold the tensors of {model_dir}; pass the checkpoint it was made from")
    tokens = calibration_windows(model_dir, text, windows, ctx)
    agree = []
    with torch.no_grad():
        xs = [nn.embed(tokens, w["token_embd.weight"]) for w in (float_w, quant_w)]
        for bid in range(spec.n_layers):
            prefix = f"blk.{bid}."
            routes = []
            for i, w in enumerate((float_w, quant_w)):
                layer = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
                xs[i], r = nn.decoder_layer(xs[i], layer, spec, bid=bid)
                routes.append(None if r is None else r.experts.sort(-1).values)
            if routes[0] is not None:
                agree.append(100.0 * float((routes[0] == routes[1]).all(-1).float().mean()))
    return agree
