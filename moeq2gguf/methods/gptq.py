"""gptq: layer-wise GPTQ into the exact GGML grids (docs/METHODS.md): each block's scales fitted by the format's
own search when the column walk reaches it, then frozen; codes rounded with error feedback through the inverse
Hessian; all experts of a tensor at once. Quantized activations propagate to the next layer."""
from __future__ import annotations

import numpy as np
import torch

from moeq2gguf.methods.base import Method, QuantizedTensor, register
from moeq2gguf.profile import stage
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import gptq_quantize


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 3 else w.unsqueeze(0)


class GPTQ(Method):
    name = "gptq"
    summary = "GPTQ into the GGML grids"
    sequential = True
    full_statistics = True
    blend_rare = False    # experts with fewer tokens than inputs: blended with the layer's pooled Hessian

    def _walk(self, w, qtype, stats, input_name, gptq):
        from moeq2gguf.quant.grid import FormatGrid
        with stage("statistics"):
            H, coverage = stats.hessians(input_name, blend_rare=self.blend_rare)
        grid = FormatGrid(qtype)
        grid.prepare(_groups(w))
        with stage("gptq"):
            return H, coverage, grid, gptq_quantize(_groups(w), H, grid, gptq)

    def _lattice(self, w, qtype, stats, input_name) -> QuantizedTensor:
        """An i-quant (formats/lattice.py): no GPTQ walk into its codebook yet; ggml's importance-weighted search on
        the diagonal of this method's Hessians (affinity-weighted and rare experts covered for moequant)."""
        with stage("statistics"):
            H, coverage = stats.hessians(input_name, blend_rare=self.blend_rare)
        importance = H.diagonal(dim1=-2, dim2=-1).to(torch.float32)
        data, deq = tensor_quant.encode(w, qtype, importance)
        _, deq_plain = tensor_quant.encode(w, qtype, tensor_quant.imatrix_importance(stats, input_name))
        info = {"type": qtype.name, "method": f"{self.name} (importance only)",
                "recon_error": tensor_quant.reconstruction_error(w, deq, H),
                "recon_error_rtn": tensor_quant.reconstruction_error(w, deq_plain, H),
                "coverage": coverage.__dict__ if stats.inputs[input_name].routed else None}
        return QuantizedTensor(data, deq, info)

    def quantize(self, w, qtype, stats, input_name, gptq) -> QuantizedTensor:
        from moeq2gguf.formats.lattice import is_lattice
        if is_lattice(qtype):
            return self._lattice(w, qtype, stats, input_name)
        H, coverage, grid, (Q3, codes, params) = self._walk(w, qtype, stats, input_name, gptq)
        with stage("pack"):
            data = grid.pack(params, codes)
        deq = torch.from_numpy(np.asarray(grid.fmt.dequantize(data), dtype=np.float32)).reshape(w.shape).to(w.device)
        if not torch.equal(deq, Q3.reshape(w.shape)):
            raise AssertionError(f"packed {qtype.name} bytes do not dequantize to the weights GPTQ simulated")
        _, deq_rtn = tensor_quant.encode(w, qtype, None)
        info = {"type": qtype.name, "method": self.name,
                "recon_error": tensor_quant.reconstruction_error(w, deq, H),
                "recon_error_rtn": tensor_quant.reconstruction_error(w, deq_rtn, H),
                # per expert (not per head): coverage of the routed ones
                "coverage": coverage.__dict__ if stats.inputs[input_name].routed else None}
        return QuantizedTensor(data.reshape(*w.shape[:-1], -1), deq, info)

    def simulate(self, w, qtype, stats, input_name, gptq) -> torch.Tensor:
        from moeq2gguf.formats.lattice import is_lattice
        if is_lattice(qtype):
            return self._lattice(w, qtype, stats, input_name).weights
        return self._walk(w, qtype, stats, input_name, gptq)[3][0].reshape(w.shape)


register(GPTQ())
