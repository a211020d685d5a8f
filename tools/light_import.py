"""moeq2gguf's standard-library-and-numpy modules (runtime.build, runtime.bench, plan.mixes, formats.ggml_ref) for tools that run
in a GPU machine's Python, which may lack the converter's dependencies: moeq2gguf/formats/__init__.py imports
numba, and other packages torch, so the packages are stood in for by empty ones and only the asked-for module
runs. Where the real packages are already imported, they are used."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module(name: str):
    """moeq2gguf.<name>, e.g. module("formats.ggml_ref"). In a process that imported the real moeq2gguf (tests, the
    .venv), its packages are imported as they are: a stand-in there would hide the real subpackage's contents."""
    real = getattr(sys.modules.get("moeq2gguf"), "__file__", None) is not None
    parts = [] if real else ["moeq2gguf", *name.split(".")[:-1]]
    for i in range(len(parts)):
        pkg_name = ".".join(parts[: i + 1])
        if pkg_name not in sys.modules:
            pkg = types.ModuleType(pkg_name)
            pkg.__path__ = [str(REPO.joinpath(*parts[: i + 1]))]
            sys.modules[pkg_name] = pkg
    return importlib.import_module(f"moeq2gguf.{name}")
