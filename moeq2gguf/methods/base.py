"""What a quantization method is to the converter: which statistics its layer pass collects, whether quantized
activations propagate to the next layer, and how it turns one tensor plus those statistics into GGML blocks.

The engine (passes/quantize.py), the sensitivity measurement (quant/sensitivity.py), the CLI's choices and
convert's defaults all read these attributes; none of them names a method. Add a method by writing a module in
this package that calls `register` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import GPTQConfig
from moeq2gguf.quant.stats import StatsCollector

Q = gguf.GGMLQuantizationType


@dataclass
class QuantizedTensor:
    data: np.ndarray          # the GGUF bytes (rows of blocks)
    weights: torch.Tensor     # what the runtime computes with (dequantized), shape of the input
    info: dict = field(default_factory=dict)   # report: type, method, errors, coverage
    walk: tuple | None = None                  # GPTQ's (grid, per-block params, codes, rounded weights): for --refine


class Method:
    """A quantization method. Subclasses set the class attributes and override quantize (and, where the
    tensor's simulated weights come cheaper than its bytes, simulate)."""
    name: str = ""
    summary: str = ""                # one line for --help
    calibrated: bool = True          # needs a calibration pass (statistics); False: tensor by tensor, no text
    sequential: bool = False         # the next layer's inputs come from this layer's quantized weights (GPTQ)
    affinity: bool = False           # statistics weighted by the routing weight (MoEQuant's AGQ)
    full_statistics: bool = False    # needs the input's second moments x x^T (Hessians), not only diagonals
    calibrates_head: bool = True     # the output projection gets statistics (llama-imatrix leaves it out)
    rotates_by_default: bool = False # convert rotates the residual stream unless told not to

    def collector(self, n_groups: int, device: torch.device | str, experts: range | None = None) -> StatsCollector:
        """The statistics this method's layer pass collects, for an input with n_groups experts (of which it keeps
        `experts`' own: a rank's share, parallel.py)."""
        return StatsCollector(n_groups, affinity=self.affinity, full=self.full_statistics, device=device, experts=experts)

    def quantize(self, w: torch.Tensor, qtype: Q, stats: StatsCollector, input_name: str,
                 gptq: GPTQConfig) -> QuantizedTensor:
        """w [R, K] or [E, R, K] (GGUF orientation) to qtype, using the statistics of the input it reads."""
        raise NotImplementedError

    def simulate(self, w: torch.Tensor, qtype: Q, stats: StatsCollector, input_name: str,
                 gptq: GPTQConfig) -> torch.Tensor:
        """The weights the runtime would compute with after quantize() (the size allocator's measurement)."""
        return self.quantize(w, qtype, stats, input_name, gptq).weights


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method available under its name (to the CLI, convert and the allocator)."""
    if not method.name or REGISTRY.get(method.name, method) is not method:
        raise ValueError(f"a method needs a unique name; {method.name!r} is taken or empty")
    REGISTRY[method.name] = method
    return method


def quantize_tensor(method: Method, w: torch.Tensor, qtype: Q, stats: StatsCollector | None, input_name: str | None,
                    gptq: GPTQConfig) -> QuantizedTensor:
    """One tensor of a calibrated layer: float types, and tensors whose input has no statistics (biases, a
    checkpoint's extra tensors), are rounded to nearest whatever the method."""
    if qtype in tensor_quant.FLOAT_TYPES or stats is None or input_name is None or input_name not in stats.inputs:
        return round_to_nearest(w, qtype)
    return method.quantize(w, qtype, stats, input_name, gptq)


# the most rows (in float32 bytes) quantize_rows hands the method at once: quantizing a matrix holds about eight
# weight-sized arrays together (GPTQ's work, the packed-bytes check, the RTN baseline, the error products), several
# GiB for the output head of a 151,936-token vocabulary
ROW_BLOCK_BYTES = 256 * 2**20


def quantize_rows(method: Method, w: torch.Tensor, qtype: Q, stats: StatsCollector | None, input_name: str | None,
                  gptq: GPTQConfig, block_bytes: int = ROW_BLOCK_BYTES) -> tuple[np.ndarray, dict]:
    """quantize_tensor of a matrix [R, K] a block of rows at a time, when only its bytes are needed (the tensors after
    the last layer: nothing computes with their quantized weights). Every method quantizes each row on its own (GPTQ:
    the same Hessian for every row), so the bytes are those of one call; the report's errors are summed."""
    rows = max(1, block_bytes // (4 * w.shape[-1]))
    if w.dim() != 2 or w.shape[0] <= rows:
        q = quantize_tensor(method, w, qtype, stats, input_name, gptq)
        return q.data, q.info
    data, infos = [], []
    for start in range(0, w.shape[0], rows):
        q = quantize_tensor(method, w[start:start + rows], qtype, stats, input_name, gptq)
        data.append(q.data)
        infos.append(q.info)
    return np.concatenate(data, axis=0), merge_infos(infos)


def merge_infos(infos: list[dict]) -> dict:
    """One tensor's report from the reports of its parts, in order (row blocks; expert groups; ranks' expert shares):
    errors summed, the experts' coverage concatenated."""
    out = dict(infos[0])
    for key in ("recon_error", "recon_error_rtn"):
        if key in out:
            out[key] = sum(i[key] for i in infos)
    if out.get("coverage") is not None:
        out["coverage"] = {k: [v for i in infos for v in i["coverage"][k]] for k in out["coverage"]}
    return out


def round_to_nearest(w: torch.Tensor, qtype: Q, importance: torch.Tensor | None = None,
                     method: str = "rtn") -> QuantizedTensor:
    """ggml's quantizer (with importance: its weighted search), for tensors a method leaves to it."""
    data, deq = tensor_quant.encode(w, qtype, importance)
    return QuantizedTensor(data, deq, {"type": qtype.name, "method": method})
