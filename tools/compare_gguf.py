"""Where two GGUF files of the same model differ: per tensor, the share of differing bytes and the
largest difference of the dequantized weights relative to the tensor's largest magnitude.

usage: python tools/compare_gguf.py A.gguf B.gguf
"""
from __future__ import annotations

import sys

import gguf
import numpy as np


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
    b = {t.name: t for t in gguf.GGUFReader(sys.argv[2]).tensors}
    if a.keys() != b.keys():
        sys.exit("the files hold different tensors; compare two files of the same model")
    n_diff = 0
    print(f"{'tensor':34} {'type':6} {'bytes differing':>16} {'max |dA-dB| / max|dA|':>24}")
    for name, ta in a.items():
        tb = b[name]
        ra, rb = np.asarray(ta.data).tobytes(), np.asarray(tb.data).tobytes()
        if ta.tensor_type == tb.tensor_type and ra == rb:
            continue
        n_diff += 1
        frac = np.mean(np.frombuffer(ra, np.uint8) != np.frombuffer(rb, np.uint8)) if len(ra) == len(rb) else 1.0
        da = gguf.quants.dequantize(ta.data, ta.tensor_type).astype(np.float64).ravel()
        db = gguf.quants.dequantize(tb.data, tb.tensor_type).astype(np.float64).ravel()
        rel = np.abs(da - db).max() / max(np.abs(da).max(), 1e-30)
        print(f"{name:34} {ta.tensor_type.name:6} {100 * frac:15.3f}% {rel:24.4f}")
    print(f"{n_diff} of {len(a)} tensors differ")


if __name__ == "__main__":
    main()
