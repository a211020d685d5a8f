#!/usr/bin/env bash
# Packs .gpu/: what tools/check_cuda_fusion.py needs on a GPU machine that has neither internet nor this project's
# .venv (the device tool: carry [".gpu"], at most 64 MiB with the tracked tree; then `bash tools/gpu_check.sh`).
# --site-only: only .gpu/site/gguf, for tools/gpu_scale.sh.
#   .gpu/files             the prepared files (check_cuda_fusion.py prepare: conversions, cached in
#                          .cache/check_cuda_fusion, ~8 min the first time; CPU logits; skeletons)
#   .gpu/llama-src.tar.xz  the vendored llama.cpp of the pinned llama-cpp-python, without the other backends
#   .gpu/site              pure-Python packages the GPU image lacks: llama_cpp (without its CPU libraries),
#                          diskcache, gguf (the image has numpy, PyYAML, jinja2: device/KINDS.md)
#   .gpu/bin/patch         in case the machine lacks it (moeq2gguf.runtime.build applies the runtime patches with it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
G=.gpu
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VERSION=$($PY -c 'from moeq2gguf.runtime import build; print(build.LLAMA_CPP_PYTHON_VERSION)')
VENDOR=.cache/llama-cpp-python-$VERSION/src/vendor
[ -f "$VENDOR/llama.cpp/CMakeLists.txt" ] || { echo "no $VENDOR/llama.cpp: run make setup first" >&2; exit 2; }

mkdir -p $G/site $G/bin
if [ "${1:-}" = --site-only ]; then   # tools/gpu_scale.sh needs only the gguf package
    rm -rf $G/site/gguf && cp -r "$SITE/gguf" $G/site/ && find $G/site -name __pycache__ -type d -prune -exec rm -rf {} +
    du -sh $G/site
    exit 0
fi
$PY tools/check_cuda_fusion.py prepare $G/files

others=(vulkan metal sycl opencl cann musa hip kompute webgpu zdnn rpc blas virtgpu hexagon openvino zendnn et)
tar -C "$VENDOR" -cJf $G/llama-src.tar.xz "${others[@]/#/--exclude=llama.cpp/ggml/src/ggml-}" \
    llama.cpp/CMakeLists.txt llama.cpp/cmake llama.cpp/include llama.cpp/src llama.cpp/ggml llama.cpp/vendor \
    llama.cpp/LICENSE

rm -rf $G/site/*
for pkg in llama_cpp diskcache gguf; do
    cp -r "$SITE/$pkg" $G/site/
done
rm -rf $G/site/llama_cpp/lib
find $G/site -name __pycache__ -type d -prune -exec rm -rf {} +
cp "$(command -v patch)" $G/bin/

du -sh $G/files $G/llama-src.tar.xz $G/site
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
bundle=$(du -sb $G | cut -f1)
echo "tracked tree $((tracked / 1048576)) MiB + .gpu $((bundle / 1048576)) MiB (the device tool carries 64 MiB)"
