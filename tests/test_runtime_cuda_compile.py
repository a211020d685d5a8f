"""runtime_patches/0003 (the CUDA fusion of the per-expert smoothing into MMQ/MMVQ's activation quantization) changes
ggml-cuda: only builds that compile ggml apply it, and its sources compile with nvcc for sm_90.

The compile check needs nvcc (no GPU, no libcuda, nothing linked) and the cuBLAS headers, which
tools/setup_env.sh fetches into .cache where nvcc is installed (runtime_build.cublas_include_dir). It compiles the
four translation units that 0003 touches (ggml-cuda.cu, mmq.cu, mmvq.cu, quantize.cu; mmq.cuh and so the mmq
template instances are unchanged) with the flags of a CMake configure. Measured on this project's 2-core machine
with other jobs running (load average 4 to 5): ggml-cuda.cu 39 s, mmq.cu 48 s, mmvq.cu 115 s, quantize.cu 23 s
at -j2, 2 min 47 s wall in all, of which about 20 s copy, patch and configure the tree (runtime_patches/README.md).
A compile is no run: nothing here executes the kernels on a GPU (tools/check_cuda_fusion.py does, on a GPU machine).
A pass is remembered under a key over the patches, sources, nvcc and files (runtime_build.cuda_check_key), so a
warm `make test` compiles only after one of those changed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeq2gguf import Moeq2ggufError
from moeq2gguf.runtime import build as runtime_build

CUDA_PATCH = "0003-cuda-fused-expert-smoothing.patch"
PATCHED_UNITS = ["ggml-cuda.cu", "mmq.cu", "mmvq.cu", "quantize.cu"]


def test_ggml_patches_apply_only_where_ggml_is_built(tmp_path):
    """The CPU build links the stock libggml: it applies (and keys its cache on) the patches outside ggml/ alone."""
    cuda_patch = runtime_build.PATCH_DIR / CUDA_PATCH
    assert all(t.startswith("ggml/src/ggml-cuda/") for t in runtime_build.patch_targets(cuda_patch))
    cpu, cuda = runtime_build.build_patches(cuda=False), runtime_build.build_patches(cuda=True)
    assert cuda_patch in cuda and cuda_patch not in cpu
    assert cpu == [p for p in runtime_build.patch_files() if p != cuda_patch]

    # a patch over both ggml/ and src/ could not be split between the two builds
    for p in cpu:
        shutil.copy(p, tmp_path)
    mixed = tmp_path / "0009-mixed.patch"
    mixed.write_text(cuda_patch.read_text() + cpu[0].read_text())
    with pytest.raises(Moeq2ggufError, match="changes both ggml/ and the rest"):
        runtime_build.build_patches(cuda=False, patch_dir=tmp_path)
    mixed.unlink()
    shutil.copy(cuda_patch, tmp_path)
    assert [p.name for p in runtime_build.build_patches(cuda=False, patch_dir=tmp_path)] == [p.name for p in cpu]


def test_cuda_check_compiles_the_touched_units():
    """The files to compile follow from the patch: the .cu files it changes and those including a header it changes."""
    cuda_dir = runtime_build.vendored_source() / "ggml" / "src" / "ggml-cuda"
    assert runtime_build.cuda_check_files(runtime_build.build_patches(cuda=True), cuda_dir) == PATCHED_UNITS


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc is not on PATH: the compile check of the CUDA patch needs the CUDA toolkit (no GPU)")
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("patch") is None,
                    reason="cmake and patch are needed to configure the patched llama.cpp tree")
def test_patched_ggml_cuda_compiles_for_sm90():
    """Every translation unit that 0003 changes compiles for sm_90 (cuda_compile_check raises on any nvcc error)."""
    results = runtime_build.cuda_compile_check(arch="90")
    for name, seconds in results:
        print(f"{name}: {seconds:.1f} s")
    assert [name for name, _ in results] == PATCHED_UNITS
    objects = Path(runtime_build.CACHE / runtime_build.CUDA_CHECK_DIR / "build")
    for name in PATCHED_UNITS:
        assert len(list(objects.rglob(f"{name}.o"))) == 1, name
    # libggml-cuda links with the version script that keeps the C++ runtime private (issue 26; linking needs
    # the GPU machine's libraries, so the configured link statement is what is checked here)
    link_txt = objects / "ggml" / "src" / "ggml-cuda" / "CMakeFiles" / "ggml-cuda.dir" / "link.txt"   # Makefiles
    if link_txt.is_file():
        link = link_txt.read_text()
    else:   # Ninja
        ninja = (objects / "build.ninja").read_text()
        link = ninja[ninja.index("CUDA_SHARED_LIBRARY_LINKER__ggml-cuda_"):]
        link = link[:link.index("\n\n")]
    assert "--version-script=" in link and "private-cxx-runtime.map" in link and "--exclude-libs,ALL" in link


def test_a_passed_compile_check_is_remembered_only_for_the_same_inputs(tmp_path):
    """The remembered pass (cuda_compile_check's .passed) is keyed on every patch's bytes, the architecture, the
    files and nvcc's version: changing any of them compiles again."""
    for p in runtime_build.build_patches(cuda=True):
        shutil.copy(p, tmp_path)
    patches = sorted(tmp_path.glob("*.patch"))
    nvcc, include = shutil.which("echo"), tmp_path / "cublas-1" / "include"   # echo: a stand-in with a "version"
    key = runtime_build.cuda_check_key("90", None, patches, nvcc, include)
    assert key == runtime_build.cuda_check_key("90", None, patches, nvcc, include)
    assert key != runtime_build.cuda_check_key("89", None, patches, nvcc, include)
    assert key != runtime_build.cuda_check_key("90", ["mmq.cu"], patches, nvcc, include)
    assert key != runtime_build.cuda_check_key("90", None, patches, shutil.which("true"), include)
    assert key != runtime_build.cuda_check_key("90", None, patches, nvcc, tmp_path / "cublas-2" / "include")
    patches[-1].write_text(patches[-1].read_text() + "\n")
    assert key != runtime_build.cuda_check_key("90", None, patches, nvcc, include)
