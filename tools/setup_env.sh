#!/usr/bin/env bash
# Creates .venv and installs everything the package and its tests need, printing each stage's time.
# Idempotent: a second run reuses the venv, the cached llama.cpp build and the installed packages.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=.venv/bin/python
stage() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "[setup] $name: $(( $(date +%s) - t0 )) s"; }

pip_quiet() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

[ -x "$PY" ] || stage "create .venv" python3 -m venv .venv
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || stage "torch 2.13.0 (CPU)" pip_quiet "torch==2.13.0"
stage "llama.cpp + llama-cpp-python" tools/build_llama.sh "$PY"
"$PY" -c "import moeq2gguf, pytest, transformers, numba" 2>/dev/null && [ ! pyproject.toml -nt .venv/.moeq2gguf-installed ] \
  || { stage "moeq2gguf and its dependencies" pip_quiet -e ".[dev]" && touch .venv/.moeq2gguf-installed; }
# libllama with runtime_patches/ applied, linked to the stock libggml above (cached under .cache/llama-patched)
stage "patched llama.cpp (runtime_patches/)" .venv/bin/moeq2gguf runtime build
# cuBLAS headers (nvidia-cublas wheel, headers kept in .cache) for the nvcc compile check of the CUDA patch
# (tests/test_runtime_cuda_compile.py); only where nvcc is installed, no GPU needed
if command -v nvcc >/dev/null; then
  stage "cuBLAS headers for nvcc" "$PY" -c "from moeq2gguf.runtime_build import cublas_include_dir; cublas_include_dir()"
fi
"$PY" -c "import llama_cpp, moeq2gguf, torch" || { echo "[setup] the environment is incomplete"; exit 1; }
