"""GGML block formats, keyed by gguf.GGMLQuantizationType.

    from moeq2gguf.formats import get_format
    fmt = get_format(GGMLQuantizationType.Q4_K)
    blocks = fmt.quantize(rows, importance)      # == ggml_quantize_chunk, byte for byte

Importing this package registers every format below in FORMATS.
"""
from moeq2gguf.formats.base import FORMATS, BlockFormat, BlockParams, get_format
from moeq2gguf.formats import iq4, legacy, q2_k, q3_k, q4_k, q6_k, q8_0  # noqa: F401  (registration)

__all__ = ["FORMATS", "BlockFormat", "BlockParams", "get_format"]
