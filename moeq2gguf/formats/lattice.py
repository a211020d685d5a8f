"""llama.cpp's i-quants (IQ1_S .. IQ3_S), whose weights are chosen jointly in groups of 4 or 8 from a grid (a lattice
codebook) rather than one by one: their quantizers (iq1.py, iq2.py, iq3.py, byte-identical to ggml) behind one entry
point. They are not BlockFormats (no per-weight codes): GPTQ walks into them a group of 8 weights at a time
(quant/lattice_grid.py, with their byte layout in iq_layout.py)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from moeq2gguf.errors import Moeq2ggufError

# the target types llama.cpp will not quantize without an importance matrix (llama-quant.cpp tensor_requires_imatrix)
NEEDS_IMPORTANCE = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS})
LATTICE_TYPES = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S})
# the types ggml's quantizer itself cannot round without an importance vector (the others fall back to x^2 weights)
KERNEL_NEEDS_IMPORTANCE = frozenset({Q.IQ1_S, Q.IQ2_XXS, Q.IQ2_XS})


def is_lattice(qtype) -> bool:
    return qtype in LATTICE_TYPES


def quantize_lattice(qtype: Q, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk's bytes for rows (R, C) float32 and importance (C,) or None."""
    from moeq2gguf.formats import iq1, iq2, iq3
    kernels = {Q.IQ1_S: iq1.quantize_iq1_s, Q.IQ1_M: iq1.quantize_iq1_m, Q.IQ2_XXS: iq2.quantize_iq2_xxs,
               Q.IQ2_XS: iq2.quantize_iq2_xs, Q.IQ2_S: iq2.quantize_iq2_s, Q.IQ3_XXS: iq3.quantize_iq3_xxs,
               Q.IQ3_S: iq3.quantize_iq3_s}
    if importance is None and qtype in KERNEL_NEEDS_IMPORTANCE:
        raise Moeq2ggufError(f"{qtype.name} needs an importance matrix (ggml's quantizer cannot run without one); "
                             "use --method imatrix, gptq or moequant, or --imatrix FILE")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not np.isfinite(rows).all():
        raise ValueError(f"{qtype.name} rows hold NaN or infinite values")
    return kernels[qtype](rows, importance)
