"""Which GGML type each tensor of the output gets.

types.py: float exports and the shared rules (norms, biases and routers stay F32); mixes.py: llama-quantize's
rules for a named mix (Q4_K_M, ...), tensor by tensor; alloc.py: a type per tensor chosen to fit a size budget
from measured sensitivities. The names below are types.py's, the ones the converter uses.
"""
from moeq2gguf.plan.types import (FLOAT_TYPES, KEEP_F32_ROLES, assign, encode_float, file_type, is_float,
                                  tensor_type, validate_type)

__all__ = ["FLOAT_TYPES", "KEEP_F32_ROLES", "assign", "encode_float", "file_type", "is_float", "tensor_type",
           "validate_type"]
