"""One tensor to one GGML type with ggml's quantizer (RTN, or its importance-weighted search), llama-imatrix's
statistic, the reconstruction error, and llama-imatrix files. The methods (moeq2gguf/methods/) build on these.

Tensors arrive in GGUF orientation and torch shape: [R, K] for a matrix, [E, R, K] for stacked
experts (each expert a group with its own statistics). Returns the bytes for the GGUF and the
dequantized weights the runtime will compute with.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from moeq2gguf import plan
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.quant.stats import StatsCollector

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 3 else w.unsqueeze(0)


F16_MAX = 65504.0


def check_weights(name: str, w: torch.Tensor, qtype: Q) -> None:
    """Refuse values the file could not hold as the checkpoint has them: NaN or infinite (a GGUF with them gives NaN
    logits; ggml's quantizers fail on them without naming the tensor), and for F16 magnitudes beyond its range
    (they would become infinite)."""
    from moeq2gguf.errors import WeightError
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        raise WeightError(f"{name}: {int(bad.sum())} of {w.numel()} values are NaN or infinite in the checkpoint; the "
                          "converted model would compute NaN. Repair the checkpoint, or pass --allow-nonfinite to write "
                          "them anyway")
    if qtype == Q.F16:
        over = w.abs() > F16_MAX
        if bool(over.any()):
            raise WeightError(f"{name}: {int(over.sum())} values exceed F16's largest value {F16_MAX:g} (max |w| "
                              f"{float(w.abs().max()):.4g}) and would become infinite; convert with --type BF16 or F32, "
                              f"or keep this tensor in F32 with --tensor-type '{name}=F32' (or --allow-nonfinite)")


def encode(w: torch.Tensor, qtype: Q, importance: torch.Tensor | None) -> tuple[np.ndarray, torch.Tensor]:
    """RTN (importance None) or ggml's importance-weighted quantizer; importance [G, K] per group."""
    if qtype in FLOAT_TYPES:
        data = plan.encode_float(w, qtype)
        if qtype == Q.F32:
            return data, w.to(torch.float32)
        return data, torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(w.shape)
    g3 = _groups(w).to(torch.float32).cpu()
    from moeq2gguf.formats.lattice import is_lattice, quantize_lattice
    if is_lattice(qtype):   # the i-quants: their own kernels, gguf-py's dequantization
        parts = [quantize_lattice(qtype, np.ascontiguousarray(g3[g].numpy()),
                                  None if importance is None else np.ascontiguousarray(importance[g].to(torch.float32).cpu().numpy()))
                 for g in range(g3.shape[0])]
        data = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        deq = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)).reshape(w.shape)
        return data.reshape(*w.shape[:-1], -1), deq.to(w.device)
    from moeq2gguf.formats import get_format
    fmt = get_format(qtype)
    parts = [fmt.quantize(np.ascontiguousarray(g3[g].numpy()),
                          None if importance is None else np.ascontiguousarray(importance[g].to(torch.float32).cpu().numpy()))
             for g in range(g3.shape[0])]
    data = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    deq = torch.from_numpy(np.asarray(fmt.dequantize(data), dtype=np.float32)).reshape(w.shape)
    return data.reshape(*w.shape[:-1], -1), deq.to(w.device)


def imatrix_importance(collector: StatsCollector, input_name: str) -> torch.Tensor:
    """llama-imatrix's statistic: per group mean of x^2 over the tokens that reached it (float32
    division as llama-quantize does it); a group that never fired gets all ones, as in llama-quantize."""
    s = collector.inputs[input_name]
    sums, counts = s.plain_sq.to(torch.float32), s.count.to(torch.float32)
    out = sums / counts.clamp_min(1)[:, None]
    out[counts == 0] = 1.0
    return out


def reconstruction_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """sum_g tr((W_g - Q_g) H_g (W_g - Q_g)^T) = the (affinity-weighted) ||W X - Q X||^2 per token.
    The products in float32 on the weights' device, the sum in float64 (tests/quant/test_gptq.py: within 1e-5 of the
    float64 output error): float64 products were most of a real-shape layer's "quantize" stage on a CPU
    (BENCHMARKS.md, conversion at real shapes)."""
    d = _groups(w).to(torch.float32) - _groups(q).to(w.device, torch.float32)
    return float(((d @ H.to(d.device, torch.float32)) * d).sum(dtype=torch.float64))


def load_imatrix(path: str | Path, sources) -> dict[str, torch.Tensor]:
    """Per-tensor importance [G, K] from a llama-imatrix GGUF file (<name>.in_sum2, <name>.counts)."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise Moeq2ggufError(f"{path} is not a llama-imatrix GGUF file ({exc})") from exc
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for s in sources:
        sums, counts = tensors.get(f"{s.name}.in_sum2"), tensors.get(f"{s.name}.counts")
        if sums is None or counts is None or len(s.shape) < 2:  # 1-D gates are never quantized
            continue
        k = s.shape[-1]
        groups = 1 if len(s.shape) == 2 else s.shape[0]
        sums_t = torch.from_numpy(np.asarray(sums.data, dtype=np.float32).reshape(groups, k).copy())
        counts_t = torch.from_numpy(np.asarray(counts.data, dtype=np.float32).reshape(groups).copy())
        imp = sums_t / counts_t.clamp_min(1)[:, None]
        imp[counts_t == 0] = 1.0
        out[s.name] = imp
    if not out:
        raise Moeq2ggufError(f"{path} has no entry for any tensor of this model; was it made for another model?")
    return out
