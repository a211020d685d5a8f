"""gptq: layer-wise GPTQ into the exact GGML grids (docs/METHODS.md): each block's scales fitted by the format's
own search when the column walk reaches it, then frozen; codes rounded with error feedback through the inverse
Hessian; all experts of a tensor at once. Quantized activations propagate to the next layer."""
from __future__ import annotations

import gguf
import numpy as np
import torch

from moeq2gguf.methods.base import Method, QuantizedTensor, register
from moeq2gguf.profile import stage
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import gptq_quantize, inverse_hessian_factor


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 3 else w.unsqueeze(0)


class GPTQ(Method):
    name = "gptq"
    summary = "GPTQ into the GGML grids"
    sequential = True
    full_statistics = True
    blend_rare = False    # experts with fewer tokens than inputs: blended with the layer's pooled Hessian

    def _walk(self, w, qtype, stats, input_name, gptq):
        from moeq2gguf.formats.lattice import is_lattice
        from moeq2gguf.quant.grid import FormatGrid
        from moeq2gguf.quant.lattice_grid import LatticeGrid
        with stage("statistics"):
            H, coverage, U = self._hessians(stats, input_name, gptq)
        grid = LatticeGrid(qtype) if is_lattice(qtype) else FormatGrid(qtype)
        grid.prepare(_groups(w))
        # the weights as the walk rounds them: only --refine reads them (a weight-sized tensor more per tensor)
        targets = torch.empty_like(_groups(w), dtype=torch.float32) if gptq.keep_rounded else None
        with stage("gptq"):
            return H, coverage, grid, (*gptq_quantize(_groups(w), H, grid, gptq, targets, U), targets)

    def _hessians(self, stats, input_name, gptq):
        """The input's Hessians, coverage and inverse-Hessian factor, kept on the collector for the next tensor that
        reads the same input (q/k/v, gate/up: in file order they follow each other; the allocator simulates one
        tensor at several types): the float64 factorisation is most of a small layer's GPTQ time on a CPU."""
        key = (input_name, self.blend_rare, gptq.damp)
        cached = stats.factor_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        stats.factor_cache = None   # free the previous input's before making this one's
        H, coverage = stats.hessians(input_name, blend_rare=self.blend_rare)
        entry = (H, coverage, inverse_hessian_factor(H, gptq.damp))
        stats.factor_cache = (key, entry)
        return entry

    def quantize(self, w, qtype, stats, input_name, gptq) -> QuantizedTensor:
        from moeq2gguf.formats.lattice import is_lattice
        H, coverage, grid, (Q3, codes, params, targets) = self._walk(w, qtype, stats, input_name, gptq)
        with stage("pack"):
            data = grid.pack(params, codes)
        decoded = gguf.quants.dequantize(data, qtype) if is_lattice(qtype) else grid.fmt.dequantize(data)
        deq = torch.from_numpy(np.asarray(decoded, dtype=np.float32)).reshape(w.shape).to(w.device)
        if not torch.equal(deq, Q3.reshape(w.shape)):
            raise AssertionError(f"packed {qtype.name} bytes do not dequantize to the weights GPTQ simulated")
        # the baseline beside it: round to nearest, or for the i-quants (which ggml will not round without an
        # importance) ggml's search on llama-imatrix's statistic
        baseline = tensor_quant.imatrix_importance(stats, input_name) if is_lattice(qtype) else None
        _, deq_base = tensor_quant.encode(w, qtype, baseline)
        info = {"type": qtype.name, "method": self.name,
                "recon_error": tensor_quant.reconstruction_error(w, deq, H),
                "recon_error_rtn": tensor_quant.reconstruction_error(w, deq_base, H),
                # per expert (not per head): coverage of the routed ones
                "coverage": coverage.__dict__ if stats.inputs[input_name].routed else None}
        walk = (grid, params, codes, targets) if gptq.keep_rounded else None
        return QuantizedTensor(data.reshape(*w.shape[:-1], -1), deq, info, walk=walk)

    def simulate(self, w, qtype, stats, input_name, gptq) -> torch.Tensor:
        return self._walk(w, qtype, stats, input_name, gptq)[3][0].reshape(w.shape)


register(GPTQ())
