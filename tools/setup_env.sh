#!/usr/bin/env bash
# Creates .venv and installs everything the package and its tests need, printing each stage's time.
# Idempotent: a second run reuses the venv, the cached llama.cpp builds and the installed packages.
# Order: llama-cpp-python's Python bindings alone first (no compile), so that installing moeq2gguf does not make
# pip build llama.cpp with -march=native; then llama.cpp itself, compiled for this CPU's instruction sets
# (moeq2gguf runtime build --stock: AMX only after a probe, docs/PLATFORMS.md); last, a self-check that runs one
# quantized matmul in a child process and stops set-up with a clear message if the library cannot run here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=.venv/bin/python
LLAMA_CPP_PYTHON_VERSION=0.3.36   # the pin in pyproject.toml and moeq2gguf/runtime/build.py
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e   # = runtime/build.py's SDIST_SHA256
SDIST_DIR=.cache/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION/sdist
stage() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "[setup] $name: $(( $(date +%s) - t0 )) s"; }

pip_quiet() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

bindings() {
  # the Python package only (LLAMA_BUILD=OFF): its ctypes loader finds the libraries built below in llama_cpp/lib
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMA_CPP_PYTHON_VERSION')" \
    2>/dev/null && return 0
  mkdir -p "$SDIST_DIR"
  [ -f "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" ] || "$PY" -m pip download -q --no-deps \
    --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SDIST_DIR"
  echo "$SDIST_SHA256  $SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" | sha256sum -c --quiet - || {
    rm -f "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    echo "[setup] the llama-cpp-python sdist is not the pinned file (sha256 $SDIST_SHA256); deleted it, check the package index"; exit 1; }
  # nothing is compiled here (LLAMA_BUILD=OFF); GGML_NATIVE=OFF keeps any build this sdist might start portable
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip_quiet --no-cache-dir --no-deps \
    "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  pip_quiet "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
}

[ -x "$PY" ] || stage "create .venv" python3 -m venv .venv
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || stage "torch 2.13.0 (CPU)" pip_quiet "torch==2.13.0"
stage "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION bindings" bindings
"$PY" -c "import moeq2gguf, pytest, transformers, numba" 2>/dev/null && [ ! pyproject.toml -nt .venv/.moeq2gguf-installed ] \
  || { stage "moeq2gguf and its dependencies" pip_quiet -e ".[dev,server,plot]" && touch .venv/.moeq2gguf-installed; }
# shared libraries (into llama_cpp/lib) + llama-quantize / llama-imatrix / llama-perplexity, cached in .cache
stage "llama.cpp for this CPU" .venv/bin/moeq2gguf runtime build --stock
# libllama with runtime_patches/ applied, linked to the stock libggml above (cached under .cache/llama-patched)
stage "patched llama.cpp (runtime_patches/)" .venv/bin/moeq2gguf runtime build
# cuBLAS headers (nvidia-cublas wheel, headers kept in .cache) for the nvcc compile check of the CUDA patch
# (tests/test_runtime_cuda_compile.py); only where nvcc is installed, no GPU needed
if command -v nvcc >/dev/null; then
  stage "cuBLAS headers for nvcc" "$PY" -c "from moeq2gguf.runtime.build import cublas_include_dir; cublas_include_dir()"
fi
stage "self-check (one quantized matmul)" .venv/bin/moeq2gguf runtime check --cpu
