"""ctypes binding to ggml's own quantizer (ggml_quantize_chunk in libggml-base), the oracle that
tests and tools/bench_formats.py compare our kernels against.

The library is the one llama-cpp-python installs next to its bindings (llama_cpp/lib). Nothing in
the conversion path imports this module.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def library_path() -> Path:
    """Path of libggml-base: the one in LLAMA_CPP_LIB_PATH when that folder has it (the libraries llama-cpp-python
    binds instead of its own, e.g. a CUDA build on a GPU machine), else the one shipped inside the installed
    llama_cpp package."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override and (Path(override) / "libggml-base.so").exists():
        return Path(override) / "libggml-base.so"
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama_cpp is not installed; the ggml oracle needs llama-cpp-python==0.3.36 "
                           "(run `make setup`)")
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            return libdir / name
    raise RuntimeError(f"no libggml-base shared library in {libdir}; reinstall llama-cpp-python "
                       "with its libraries (`make setup`)")


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


def requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def _check(rows: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None):
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D (n_rows, n_cols), got shape {rows.shape}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if rows.shape[1] % block_size:
        raise ValueError(f"row size {rows.shape[1]} is not a multiple of {qtype.name} block size {block_size}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (rows.shape[1],):
            raise ValueError(f"importance shape {importance.shape} must be ({rows.shape[1]},)")
    return rows, importance, rows.shape[1] // block_size * type_size


def quantize_chunk(rows: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None,
                   start_row: int = 0, n_rows: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk(qtype, rows, ..., imatrix=importance) on rows[start_row:start_row+n_rows].

    rows: (R, C) float32; importance: (C,) float32 or None (ggml's imatrix=NULL).
    Returns (or fills) out: (R, C // block_size * type_size) uint8, only the chunk's rows written."""
    rows, importance, row_bytes = _check(rows, qtype, importance)
    n_total, n_cols = rows.shape
    n_rows = n_total - start_row if n_rows is None else n_rows
    if out is None:
        out = np.zeros((n_total, row_bytes), dtype=np.uint8)
    assert out.shape == (n_total, row_bytes) and out.dtype == np.uint8 and out.flags.c_contiguous
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))  # builds the IQ lookup tables; a no-op after the first call
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, start_row * n_cols,
                                      n_rows, n_cols, None if importance is None else importance.ctypes.data)
    assert written == n_rows * row_bytes, (written, n_rows, row_bytes)
    return out


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None,
             n_threads: int = 1) -> np.ndarray:
    """ggml's quantization of all rows; with n_threads > 1 the rows are split into chunks that a
    thread pool quantizes concurrently (ctypes releases the GIL during the C call)."""
    rows, importance, row_bytes = _check(rows, qtype, importance)
    out = np.zeros((rows.shape[0], row_bytes), dtype=np.uint8)
    if n_threads <= 1 or rows.shape[0] < 2:
        return quantize_chunk(rows, qtype, importance, out=out)
    _lib().ggml_quantize_init(int(qtype))
    bounds = np.linspace(0, rows.shape[0], min(n_threads * 4, rows.shape[0]) + 1).astype(int)
    with ThreadPoolExecutor(n_threads) as pool:
        jobs = [pool.submit(quantize_chunk, rows, qtype, importance, int(a), int(b - a), out)
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for job in jobs:
            job.result()
    return out


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """ggml's own C dequantizer (type_traits[qtype].to_float), the runtime's reference values:
    (R, nb * type_size) uint8 -> (R, nb * block_size) float32."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] % type_size:
        raise ValueError(f"data shape {data.shape} is not (R, k * {type_size}) for {qtype.name}")
    traits = _lib().ggml_get_type_traits(int(qtype)).contents
    assert traits.type_size == type_size and traits.blck_size == block_size, qtype
    out = np.empty((data.shape[0], data.shape[1] // type_size * block_size), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data, out.size)
    return out
