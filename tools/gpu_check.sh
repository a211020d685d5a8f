#!/usr/bin/env bash
# On the GPU machine, from the repository root, after tools/gpu_bundle.sh here (device tool: carry [".gpu"]):
#   bash tools/gpu_check.sh [check options]      e.g. --synth qwen1.5-moe-a2.7b:8 --rounds 3
# unpacks the bundle and runs tools/check_cuda_fusion.py check on .gpu/files with the C++ probe, the
# flash-attention kernels and NCCL off (neither is used: the check runs with flash attention off). Output in $OUT:
# log.txt and cuda_fusion.json (written after each step).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
command -v patch >/dev/null || export PATH=$PATH:$PWD/.gpu/bin
export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
VERSION=$(python3 -c 'import sys; sys.path.insert(0, "tools"); import light_import
print(light_import.module("runtime.build").LLAMA_CPP_PYTHON_VERSION)') || exit 3
VENDOR=.cache/llama-cpp-python-$VERSION/src/vendor
mkdir -p "$VENDOR" && tar -xJf .gpu/llama-src.tar.xz -C "$VENDOR" || exit 4
# CHECK_TIMEOUT (default 540 s, under the device's 600 s a call): past it the check stops, keeping what it measured
timeout "${CHECK_TIMEOUT:-540}" python3 tools/check_cuda_fusion.py check .gpu/files --out "$OUT" --jobs "$(nproc)" --engine probe \
    --cmake-arg=-DGGML_CUDA_FA=OFF --cmake-arg=-DGGML_CUDA_NCCL=OFF "$@" 2>&1 | tee "$OUT/log.txt" \
    | grep -v '^\[[0-9]*/[0-9]*\] \(Building\|Linking\)'
