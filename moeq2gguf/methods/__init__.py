"""The registry of quantization methods: one module per method in this package, each registering one Method.

    from moeq2gguf import methods
    methods.get("moequant").sequential        # True
    methods.names()                           # ("rtn", "imatrix", "gptq", "moequant", ...)

Modules in this folder are imported at first use, so a new method is one file here; `register` also takes a
Method made elsewhere (a test, a plug-in package).
"""
from __future__ import annotations

import importlib
import pkgutil

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.methods.base import (REGISTRY, Method, QuantizedTensor, merge_infos, quantize_rows, quantize_tensor,
                                    register, round_to_nearest)

__all__ = ["Method", "QuantizedTensor", "get", "merge_infos", "names", "quantize_rows", "quantize_tensor", "register",
           "round_to_nearest"]

_ORDER = ("rtn", "imatrix", "gptq", "moequant")   # how --help lists the built-in ones
_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                importlib.import_module(f"{__name__}.{module.name}")


def names() -> tuple[str, ...]:
    _load()
    return tuple(sorted(REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)))


def get(name: str) -> Method:
    _load()
    if name not in REGISTRY:
        raise Moeq2ggufError(f"--method {name} is unknown; choose one of {', '.join(names())}")
    return REGISTRY[name]
