"""The patched llama.cpp runtime: per-expert input smoothing and the expert Hadamard (runtime_patches/).

`build()` takes the llama.cpp tree vendored in the pinned llama-cpp-python sdist (the copy that
tools/build_llama.sh unpacked under .cache/, else the sdist fetched from the package registry with pip),
applies runtime_patches/*.patch and compiles libllama alone. The patches touch only llama.cpp's src/, so
the patched libllama links against the stock libggml that llama-cpp-python already ships (its
llama_cpp/lib): nothing of ggml is recompiled, and the CPU, CUDA, Metal or Vulkan kernels stay the
installed ones. The result is a folder (.cache/llama-patched/lib) holding the patched libllama next to
copies of those ggml libraries.

`build(cuda=True)` is for an installation whose libggml has no CUDA: it builds ggml with GGML_CUDA from the
same vendored tree next to the patched libllama, in .cache/llama-patched-cuda/ (a full ggml-cuda build is
20 to 30 minutes on 2 cores; ENVIRONMENT.md).

A build is cached under a key over the llama-cpp-python version, the patch files, the build options and
the stock ggml libraries; a second call with the same key returns at once.

llama-cpp-python binds its library once, at import, from LLAMA_CPP_LIB_PATH (else llama_cpp/lib): a process
runs either the stock or the patched llama.cpp. `patched_env()` is the environment of a process that
runs the patched one (moeq2gguf.runtime.run_logits starts such a process).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"   # the pin in pyproject.toml and tools/build_llama.sh
ROOT = Path(__file__).resolve().parents[1]
PATCH_DIR = ROOT / "runtime_patches"
CACHE = ROOT / ".cache"
STAMP = ".complete"
RECIPE = 1   # bump when build() changes what it produces
# top-level folders of the vendored tree that a libllama (+ ggml) build never reads
SKIP_DIRS = frozenset({".git", ".github", ".devops", "models", "docs", "tools", "tests", "benches", "examples", "pocs",
                       "app", "media", "gguf-py", "conversion", "grammars", "scripts", "skills", "ci", "requirements",
                       "licenses", "common"})


@dataclass(frozen=True)
class BuildResult:
    lib_dir: Path       # LLAMA_CPP_LIB_PATH for a process that runs the patched llama.cpp
    seconds: float
    cached: bool


def patch_files(patch_dir: Path = PATCH_DIR) -> list[Path]:
    patches = sorted(patch_dir.glob("*.patch"))
    if not patches:
        raise Moeq2ggufError(f"no *.patch files in {patch_dir}; the patched runtime is built from the repository's "
                             "runtime_patches/ folder")
    return patches


def stock_lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise Moeq2ggufError("llama-cpp-python is not installed; run `make setup`")
    lib = Path(spec.origin).parent / "lib"
    if not (lib / "libggml.so").exists():
        raise Moeq2ggufError(f"{lib} holds no libggml.so; reinstall llama-cpp-python (`make setup`)")
    return lib


def _sdist_dir() -> Path:
    return CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def vendored_source() -> Path:
    """The vendored llama.cpp tree of the pinned sdist: unpacked by tools/build_llama.sh, else unpacked here from
    the sdist (downloaded with pip when missing)."""
    unpacked = _sdist_dir() / "src" / "vendor" / "llama.cpp"
    if (unpacked / "CMakeLists.txt").is_file():
        return unpacked
    own = CACHE / "llama-patched-sdist" / "src"
    if (own / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return own / "vendor" / "llama.cpp"
    sdist = _sdist_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading the llama-cpp-python %s sdist", LLAMA_CPP_PYTHON_VERSION)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist.parent)], "pip download")
    tmp = own.with_name("src.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
        for m in members:
            m.name = m.name[len(top) + 1:]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(own, ignore_errors=True)
    tmp.rename(own)
    return own / "vendor" / "llama.cpp"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(cuda: bool, cuda_arch: str | None, patches: list[Path], stock: Path | None) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE} llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} cuda={cuda} arch={cuda_arch}\n".encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    if stock is not None:
        for lib in sorted(stock.glob("libggml*.so")):
            h.update(lib.name.encode() + b"\0" + _file_digest(lib.resolve()).encode())
    return h.hexdigest()


def build_dir(cuda: bool = False) -> Path:
    return CACHE / ("llama-patched-cuda" if cuda else "llama-patched")


def cached_lib_dir(cuda: bool = False) -> Path | None:
    """The patched libraries' folder if a complete build for the current patches and stock libraries exists."""
    out = build_dir(cuda)
    stamp = out / "lib" / STAMP
    if not stamp.is_file():
        return None
    try:
        key = cache_key(cuda, stamp.read_text().split("\n")[1] or None, patch_files(),
                        None if cuda else stock_lib_dir())
    except (Moeq2ggufError, IndexError):
        return None
    return out / "lib" if stamp.read_text().split("\n")[0] == key else None


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         quiet: bool = False) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-3000:] if quiet else ""
        raise Moeq2ggufError(f"{what} failed with code {proc.returncode}: {' '.join(cmd)}\n{tail}".rstrip())


def _copy_libs(src: Path, dst: Path, pattern: str) -> None:
    """Copy lib*.so* keeping the soname symlinks (as cp -P does)."""
    for f in sorted(src.glob(pattern)):
        target = dst / f.name
        if f.is_symlink():
            target.symlink_to(os.readlink(f))
        else:
            shutil.copy2(f, target)


def _ggml_import_config(folder: Path, lib_dir: Path, include_dir: Path) -> None:
    """A ggml-config.cmake that makes llama.cpp's LLAMA_USE_SYSTEM_GGML path link the stock libggml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ggml-config.cmake").write_text(f"""# written by moeq2gguf.runtime_build: the stock libggml of llama-cpp-python
add_library(ggml::ggml-base SHARED IMPORTED)
set_target_properties(ggml::ggml-base PROPERTIES
    IMPORTED_LOCATION "{lib_dir}/libggml-base.so"
    INTERFACE_INCLUDE_DIRECTORIES "{include_dir}")
add_library(ggml::ggml SHARED IMPORTED)
set_target_properties(ggml::ggml PROPERTIES
    IMPORTED_LOCATION "{lib_dir}/libggml.so"
    INTERFACE_INCLUDE_DIRECTORIES "{include_dir}"
    INTERFACE_LINK_LIBRARIES ggml::ggml-base)
set(ggml_FOUND TRUE)
""")


def build(cuda: bool = False, cuda_arch: str | None = None, jobs: int | None = None, force: bool = False) -> BuildResult:
    """Build (or find cached) the patched llama.cpp libraries; returns their folder."""
    t0 = time.perf_counter()
    patches = patch_files()
    stock = None if cuda else stock_lib_dir()
    key = cache_key(cuda, cuda_arch, patches, stock)
    out = build_dir(cuda)
    lib = out / "lib"
    stamp = lib / STAMP
    if not force and stamp.is_file() and stamp.read_text().split("\n")[0] == key:
        return BuildResult(lib, time.perf_counter() - t0, cached=True)
    for tool in ("cmake", "patch"):
        if shutil.which(tool) is None:
            raise Moeq2ggufError(f"{tool} is not installed; the patched runtime build needs cmake, patch and a C++17 "
                                 "compiler")

    source = vendored_source()
    src, bld = out / "src", out / "build"
    shutil.rmtree(src, ignore_errors=True)
    # the build folder is kept: an unchanged tree compiles incrementally; changed patches rewrite the sources
    shutil.copytree(source, src, ignore=lambda d, names: SKIP_DIRS & set(names) if Path(d) == source else set(),
                    symlinks=True)
    for p in patches:
        _run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(p)], f"applying {p.name}", cwd=src)

    args = ["cmake", "-S", str(src), "-B", str(bld), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_COMMIT=moeq2gguf-patched", "-DCMAKE_BUILD_RPATH=$ORIGIN",
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=OFF"]
    env = dict(os.environ)
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if shutil.which("ccache"):
        env["CCACHE_BASEDIR"] = str(ROOT)
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    targets = ["llama"]
    if cuda:
        args += ["-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF"]
        if cuda_arch:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
        targets.append("ggml")
    else:
        # link the stock libggml of llama-cpp-python: the patches leave ggml untouched
        staged = out / "ggml-stock"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        _copy_libs(stock, staged, "libggml*.so*")
        _ggml_import_config(out / "ggml-cmake", staged, src / "ggml" / "include")
        args += ["-DLLAMA_USE_SYSTEM_GGML=ON", f"-Dggml_DIR={out / 'ggml-cmake'}"]
    log.info("configuring the patched llama.cpp in %s", bld)
    _run(args, "cmake configure", env=env, quiet=True)
    jobs = jobs or os.cpu_count() or 1
    log.info("compiling %s with %d jobs", " + ".join(targets), jobs)
    _run(["cmake", "--build", str(bld), "-j", str(jobs), "--target", *targets], "cmake build", env=env)

    tmp = out / "lib.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _copy_libs(bld / "bin", tmp, "libllama.so*")
    _copy_libs(bld / "bin" if cuda else out / "ggml-stock", tmp, "libggml*.so*")
    if not (tmp / "libllama.so").exists():
        raise Moeq2ggufError(f"the patched build left no libllama.so in {bld / 'bin'}")
    (tmp / STAMP).write_text(f"{key}\n{cuda_arch or ''}\n")
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    seconds = time.perf_counter() - t0
    log.info("patched llama.cpp built in %.0f s: %s", seconds, lib)
    return BuildResult(lib, seconds, cached=False)


def patched_env(lib_dir: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a process whose llama-cpp-python binds the patched llama.cpp."""
    lib_dir = lib_dir or cached_lib_dir()
    if lib_dir is None:
        raise Moeq2ggufError("the patched llama.cpp is not built; run `moeq2gguf runtime build`")
    env = dict(os.environ if base is None else base)
    env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env
