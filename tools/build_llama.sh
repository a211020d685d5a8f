#!/usr/bin/env bash
# Builds the llama.cpp tree vendored by the pinned llama-cpp-python sdist (shared libraries plus
# llama-quantize / llama-imatrix / llama-perplexity) with CMake, then installs the Python bindings
# without a second compile and places the built libraries inside the installed llama_cpp/lib.
# One CMake build instead of pip's (which compiles mtmd and cannot give us the tools) is about
# 40% faster on 2 cores; the result is cached under .cache/ and reused while the pin is unchanged.
#
# usage: tools/build_llama.sh PYTHON   (the venv's python)
set -euo pipefail
PY=${1:?usage: build_llama.sh PYTHON}
VERSION=0.3.36
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$ROOT/.cache/llama-cpp-python-$VERSION
SRC=$CACHE/src
BUILD=$CACHE/build
STAMP=$BUILD/.complete

now() { date +%s; }
t0=$(now)
if [ ! -f "$STAMP" ]; then
  if [ ! -d "$SRC" ]; then
    mkdir -p "$CACHE/sdist"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
  fi
  launcher=()
  if command -v ccache >/dev/null; then
    export CCACHE_BASEDIR=$ROOT
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  fi
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${generator[@]}" "${launcher[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
  cmake --build "$BUILD" -j"$(nproc)" --target llama ggml llama-quantize llama-imatrix llama-perplexity
  touch "$STAMP"
  echo "[build_llama] compiled llama.cpp in $(( $(now) - t0 )) s"
else
  echo "[build_llama] llama.cpp build cached in $BUILD"
fi

t1=$(now)
LIBDIR=$("$PY" - <<'PYEOF' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("llama_cpp")
print(pathlib.Path(spec.origin).parent / "lib" if spec else "")
PYEOF
)
if [ -z "$LIBDIR" ] || ! cmp -s "$BUILD/bin/libllama.so" "$LIBDIR/libllama.so" 2>/dev/null; then
  # LLAMA_BUILD=OFF: only the Python package is installed; its ctypes loader looks in llama_cpp/lib.
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q --no-cache-dir --no-deps \
    "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
  "$PY" -m pip install -q "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
  LIBDIR=$("$PY" -c 'import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent/"lib")')
  mkdir -p "$LIBDIR"
  cp -P "$BUILD"/bin/lib*.so* "$LIBDIR"/
  echo "[build_llama] installed llama-cpp-python $VERSION bindings in $(( $(now) - t1 )) s"
else
  echo "[build_llama] llama-cpp-python $VERSION already installed"
fi
