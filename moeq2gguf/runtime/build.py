"""The patched llama.cpp runtime: per-expert input smoothing and the expert Hadamard (runtime_patches/).

`build()` takes the llama.cpp tree vendored in the pinned llama-cpp-python sdist (unpacked under .cache/ from
the sdist that set-up fetched from the package registry with pip, else fetched here),
applies runtime_patches/*.patch and compiles libllama alone. The patches touch only llama.cpp's src/, so
the patched libllama links against the stock libggml that llama-cpp-python already ships (its
llama_cpp/lib): nothing of ggml is recompiled, and the CPU, CUDA, Metal or Vulkan kernels stay the
installed ones. The result is a folder (.cache/llama-patched/lib) holding the patched libllama next to
copies of those ggml libraries.

`build(cuda=True)` is for an installation whose libggml has no CUDA: it builds ggml with GGML_CUDA from the
same vendored tree next to the patched libllama, in .cache/llama-patched-cuda/ (a full ggml-cuda build is
20 to 30 minutes on 2 cores; docs/PLATFORMS.md). Only this build applies the patches that change ggml (0003, the
CUDA fusion of the smoothing); the CPU build applies those outside ggml/ and links the stock libggml.

`cuda_compile_check()` compiles, with nvcc and no GPU, the ggml-cuda sources that those patches touch, with the
flags a CMake configure of the patched tree gives them (cuBLAS headers from the nvidia-cublas wheel).

A build is cached under a key over the llama-cpp-python version, the patch files, the build options and
the stock ggml libraries; a second call with the same key returns at once.

llama-cpp-python binds its library once, at import, from LLAMA_CPP_LIB_PATH (else llama_cpp/lib): a process
runs either the stock or the patched llama.cpp. `patched_env()` is the environment of a process that
runs the patched one (moeq2gguf.runtime.run_logits starts such a process).

`build_stock()` is the stock llama.cpp of the same tree that set-up installs into llama-cpp-python (shared
libraries plus llama-quantize / llama-imatrix / llama-perplexity). Every build here is compiled for the
instruction sets of `cpu_choice()`: what this CPU reports, AMX only after the self-check ran ggml's AMX matmul
on an AMX build of this machine (moeq2gguf.runtime.cpu_features, moeq2gguf.runtime.selfcheck, docs/PLATFORMS.md); the choice
is part of each cache key.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from moeq2gguf.runtime import cpu_features
from moeq2gguf.errors import Moeq2ggufError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"   # the pin in pyproject.toml and tools/setup_env.sh
# sha256 of its sdist (llama_cpp_python-0.3.36.tar.gz, the file the package index serves); tools/setup_env.sh checks it too
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH_DIR = Path(__file__).resolve().parent / "patches"   # package data (runtime_patches/ in a checkout links here)
ROOT = Path(__file__).resolve().parents[2]


def _cache_root() -> Path:
    """Where builds are kept: the checkout's .cache (what `make setup` fills), else, for an installed package,
    $XDG_CACHE_HOME/moeq2gguf (default ~/.cache/moeq2gguf)."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "moeq2gguf" / "runtime" / "build.py").is_file():
        return ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeq2gguf"


CACHE = _cache_root()
STAMP = ".complete"
RECIPE = 3   # bump when build() or build_stock() changes what it produces (3: the C++ runtime kept private)
AMX_VERDICT = CACHE / "amx-probe.json"   # the AMX probe's result for this machine (cpu_features.probe_key)
STOCK_TARGETS = ("llama", "ggml", "llama-quantize", "llama-imatrix", "llama-perplexity")
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
        raise Moeq2ggufError(f"no *.patch files in {patch_dir}; the patched runtime is built from the patches the "
                             "package ships (moeq2gguf/runtime/patches); reinstall moeq2gguf")
    return patches


def patch_targets(patch: Path) -> list[str]:
    """The paths (from the tree's root) that a `patch -p1` file creates, changes or deletes."""
    targets: list[str] = []
    lines = patch.read_text().splitlines()
    for old, new in zip(lines, lines[1:]):
        if not (old.startswith("--- ") and new.startswith("+++ ")):   # a file's header, not a hunk's line
            continue
        for line in (old, new):
            path = line[4:].split("\t")[0].strip()
            if path != "/dev/null" and path.split("/", 1)[1] not in targets:
                targets.append(path.split("/", 1)[1])
    return targets


def patches_ggml(patch: Path) -> bool:
    """Whether the patch changes ggml (then only a build that compiles ggml can apply it)."""
    in_ggml = [t.startswith("ggml/") for t in patch_targets(patch)]
    if any(in_ggml) and not all(in_ggml):
        raise Moeq2ggufError(f"{patch.name} changes both ggml/ and the rest of llama.cpp; split it in two: the CPU "
                             "build links the stock libggml and applies only the patches outside ggml/")
    return any(in_ggml)


def build_patches(cuda: bool, patch_dir: Path = PATCH_DIR) -> list[Path]:
    """The patches a build applies: all of them when it compiles ggml (cuda), else those outside ggml/."""
    patches = patch_files(patch_dir)
    return patches if cuda else [p for p in patches if not patches_ggml(p)]


def stock_lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python (found without importing it), with its libraries."""
    lib = bindings_lib_dir()
    if not (lib / "libggml.so").exists():
        raise Moeq2ggufError(f"{lib} holds no libggml.so; reinstall llama-cpp-python (`make setup`)")
    return lib


def _sdist_dir() -> Path:
    return CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def vendored_source() -> Path:
    """The vendored llama.cpp tree of the pinned sdist, unpacked under .cache from the sdist (downloaded with pip
    when set-up has not fetched it)."""
    own = _sdist_dir() / "src"
    if (own / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return own / "vendor" / "llama.cpp"
    sdist = _sdist_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading the llama-cpp-python %s sdist", LLAMA_CPP_PYTHON_VERSION)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist.parent)], "pip download")
    check_sdist(sdist)
    tmp = own.with_name("src.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
        for m in members:
            m.name = m.name[len(top) + 1:]
        safe_extract(tar, members, tmp)
    shutil.rmtree(own, ignore_errors=True)
    tmp.rename(own)
    return own / "vendor" / "llama.cpp"


def check_sdist(sdist: Path) -> None:
    """The downloaded sdist is the one this version pins (a different file is deleted and named)."""
    digest = _file_digest(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise Moeq2ggufError(f"{sdist.name} has sha256 {digest}, not the pinned {SDIST_SHA256}: the package index served "
                             "another file (deleted); check the index you install from, then run the build again")


def safe_extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> None:
    """extractall refusing absolute paths, '..', links, devices: tarfile's "data" filter where this Python has it
    (3.12, 3.11.4, 3.10.12 and later), the same checks by hand before."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    root = dest.resolve()
    for m in members:
        target = (dest / m.name).resolve()
        if m.name.startswith("/") or not str(target).startswith(str(root)) or not (m.isfile() or m.isdir()):
            raise Moeq2ggufError(f"the sdist holds {m.name!r}, which is not a plain file inside the archive's folder; "
                                 "refusing to extract it")
    tar.extractall(dest, members=members)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_patches(h, patches: list[Path]) -> None:
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes())


def cache_key(cuda: bool, cuda_arch: str | None, patches: list[Path], stock: Path | None,
              cmake_args: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE} llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} cuda={cuda} arch={cuda_arch}\n".encode())
    if cuda:   # compiles ggml's CPU backend too (the CPU build links the stock ggml, hashed below)
        h.update(("cpu " + json.dumps(cpu_choice().cmake_args()) + "\n").encode())
    if cmake_args:
        h.update(("cmake " + json.dumps(list(cmake_args)) + "\n").encode())
    _hash_patches(h, patches)
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
    lines = stamp.read_text().split("\n")
    try:
        extra = tuple(json.loads(lines[2])) if len(lines) > 2 and lines[2] else ()
        key = cache_key(cuda, lines[1] or None, build_patches(cuda), None if cuda else stock_lib_dir(), extra)
    except (Moeq2ggufError, IndexError, ValueError):
        return None
    return out / "lib" if lines[0] == key else None


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
    (folder / "ggml-config.cmake").write_text(f"""# written by moeq2gguf.runtime.build: the stock libggml of llama-cpp-python
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


def _patched_tree(src: Path, patches: list[Path]) -> None:
    """A fresh copy of the vendored tree (less what no build reads) at src, with the patches applied."""
    source = vendored_source()
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(source, src, ignore=lambda d, names: SKIP_DIRS & set(names) if Path(d) == source else set(),
                    symlinks=True)
    for p in patches:
        _run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(p)], f"applying {p.name}", cwd=src)


def cxx_runtime_library() -> Path:
    """The libstdc++.so.6 of the C++ compiler that builds (the one our libraries bind at run time)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise Moeq2ggufError("no C++ compiler found (set CXX or install g++); building llama.cpp needs one")
    found = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    if not found or not Path(found).is_file():
        raise Moeq2ggufError(f"{cxx} names no libstdc++.so.6 ({found!r}); the patched build links against it")
    return Path(found).resolve()


def dynamic_symbols(lib: Path) -> set[str]:
    """Names of the dynamic symbols a shared library defines (without their version suffix), by binutils' nm."""
    if shutil.which("nm") is None:
        raise Moeq2ggufError("nm (binutils) is not installed; it comes with the compiler toolchain the build needs")
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True)
    if out.returncode != 0:
        raise Moeq2ggufError(f"nm could not read {lib}: {out.stderr.strip()}")
    return {f.split()[-1].split("@")[0] for f in out.stdout.splitlines() if len(f.split()) >= 3}


def private_cxx_runtime_args(out: Path) -> list[str]:
    """Link options that keep the C++ runtime private to each library we build.

    Template code of the C++ standard library instantiated in our objects (std::string, streams, ...) is exported
    by default, as weak definitions. Another library loaded before libstdc++ then answers for libstdc++ itself:
    on a GPU machine libllama's stream output bound to libggml-cuda's copies and llama-cpp-python crashed
    (BENCHMARKS.md, GPU section). A version script marks local every name libstdc++ defines (exact names win over
    its `global: *`), and --exclude-libs keeps static archives' symbols (cudart_static) inside too; the llama_,
    ggml_ and gguf_ interfaces, C and C++, stay exported."""
    names = sorted(dynamic_symbols(cxx_runtime_library()))
    script = out / "private-cxx-runtime.map"
    _write_atomic(script, "/* written by moeq2gguf.runtime.build: the C++ runtime's names stay local */\n"
                  "{\n  global: *;\n  local:\n" + "".join(f"    {n};\n" for n in names) + "};\n")
    return [f"-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--version-script={script} -Wl,--exclude-libs,ALL"]


def build(cuda: bool = False, cuda_arch: str | None = None, jobs: int | None = None, force: bool = False,
          cmake_args: tuple[str, ...] = ()) -> BuildResult:
    """Build (or find cached) the patched llama.cpp libraries; returns their folder. cmake_args: extra
    configure options (e.g. where cuBLAS is, -DGGML_CUDA_FA=OFF), part of the cache key."""
    t0 = time.perf_counter()
    patches = build_patches(cuda)
    stock = None if cuda else stock_lib_dir()
    cmake_args = tuple(cmake_args)
    key = cache_key(cuda, cuda_arch, patches, stock, cmake_args)
    out = build_dir(cuda)
    lib = out / "lib"
    stamp = lib / STAMP
    if not force and stamp.is_file() and stamp.read_text().split("\n")[0] == key:
        return BuildResult(lib, time.perf_counter() - t0, cached=True)
    for tool in ("cmake", "patch"):
        if shutil.which(tool) is None:
            raise Moeq2ggufError(f"{tool} is not installed; the patched runtime build needs cmake, patch and a C++17 "
                                 "compiler")

    src, bld = out / "src", out / "build"
    # the build folder is kept: an unchanged tree compiles incrementally; changed patches rewrite the sources
    _patched_tree(src, patches)

    args = ["cmake", "-S", str(src), "-B", str(bld), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_COMMIT=moeq2gguf-patched", "-DCMAKE_BUILD_RPATH=$ORIGIN",
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=OFF"]
    env = dict(os.environ)
    args += _cmake_tool_args(env)
    out.mkdir(parents=True, exist_ok=True)
    args += private_cxx_runtime_args(out)
    targets = ["llama"]
    if cuda:
        args += ["-DGGML_CUDA=ON", *cpu_choice().cmake_args()]
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
    args += cmake_args
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
    (tmp / STAMP).write_text(f"{key}\n{cuda_arch or ''}\n{json.dumps(list(cmake_args)) if cmake_args else ''}\n")
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    seconds = time.perf_counter() - t0
    log.info("patched llama.cpp built in %.0f s: %s", seconds, lib)
    return BuildResult(lib, seconds, cached=False)


def _amx_probe_key() -> str:
    return f"{cpu_features.probe_key()} llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} recipe {RECIPE}"


def amx_policy() -> str:
    """MOEQ2GGUF_AMX: probe (default: AMX stays on only where ggml's AMX matmul passed the self-check) or off."""
    policy = os.environ.get("MOEQ2GGUF_AMX", "probe")
    if policy not in ("probe", "off"):
        raise Moeq2ggufError(f"MOEQ2GGUF_AMX={policy!r} is not a policy; use probe (the default: AMX only where ggml's "
                             "AMX matmul passes the self-check on this machine) or off")
    return policy


def recorded_amx_verdict() -> bool | None:
    """Whether ggml's AMX matmul passed the probe on this machine (None: not probed here, or policy off)."""
    if amx_policy() == "off":
        return None
    try:
        record = json.loads(AMX_VERDICT.read_text())
    except (OSError, ValueError):
        return None
    return bool(record["works"]) if record.get("key") == _amx_probe_key() else None


def cpu_choice() -> cpu_features.CpuChoice:
    """The instruction sets every llama.cpp build here is compiled for: this CPU's, AMX per the recorded probe."""
    return cpu_features.this_machine(amx_probe=recorded_amx_verdict())


def stock_build_dir() -> Path:
    return _sdist_dir() / "build"


def _cmake_tool_args(env: dict[str, str]) -> list[str]:
    """Ninja and ccache when installed (ccache keyed on paths relative to the checkout)."""
    args = []
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if shutil.which("ccache"):
        env["CCACHE_BASEDIR"] = str(ROOT)
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    return args


def _build_stock_tree(src: Path, bld: Path, choice: cpu_features.CpuChoice, targets: tuple[str, ...],
                      jobs: int | None) -> None:
    env = dict(os.environ)
    args = ["cmake", "-S", str(src), "-B", str(bld), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TOOLS=ON", *_cmake_tool_args(env),
            *choice.cmake_args()]
    _run(args, "cmake configure", env=env, quiet=True)
    _run(["cmake", "--build", str(bld), "-j", str(jobs or os.cpu_count() or 1), "--target", *targets], "cmake build",
         env=env)


def probe_amx(jobs: int | None = None, say=log.info) -> bool:
    """Build ggml with AMX in the stock build folder and run the self-check's quantized matmul on it in a child;
    record the verdict for this machine (AMX_VERDICT). True: AMX works here."""
    from moeq2gguf.runtime import selfcheck
    choice = cpu_features.this_machine(amx_probe=True)
    say(f"this CPU reports AMX; probing ggml's AMX matmul with a build for {' '.join(choice.enabled)}")
    (stock_build_dir() / STAMP).unlink(missing_ok=True)
    _build_stock_tree(vendored_source(), stock_build_dir(), choice, ("llama", "ggml"), jobs)
    result = selfcheck.run_child(stock_build_dir() / "bin")
    record = {"key": _amx_probe_key(), "works": result.ok, "cpu": choice.model, "returncode": result.returncode,
              "signal": result.signal_name, "output": result.output, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_atomic(AMX_VERDICT, json.dumps(record, indent=1) + "\n")
    say(f"AMX probe: {'passed' if result.ok else 'failed'} ({result.signal_name or 'exit ' + str(result.returncode)}); "
        f"AMX {'stays on' if result.ok else 'left out'} (recorded in {AMX_VERDICT})")
    return result.ok


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bindings_lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python, where its ctypes loader looks for libllama."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise Moeq2ggufError("llama-cpp-python's Python bindings are not installed; run `make setup`")
    return Path(spec.origin).parent / "lib"


def install_libs(src: Path, dst: Path) -> bool:
    """Copy lib*.so* from src into dst (symlinks kept) unless dst has the same files; each file is replaced by a new
    one (rename), never rewritten in place, so a process that has the old one mapped keeps running. True: copied."""
    files = sorted(src.glob("lib*.so*"))
    if not files:
        raise Moeq2ggufError(f"no lib*.so* in {src}")
    def same(f: Path) -> bool:
        t = dst / f.name
        if f.is_symlink():
            return t.is_symlink() and os.readlink(t) == os.readlink(f)
        return t.is_file() and not t.is_symlink() and t.stat().st_size == f.stat().st_size and \
            _file_digest(t) == _file_digest(f)
    if all(same(f) for f in files):
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        tmp = dst / f".{f.name}.tmp"
        tmp.unlink(missing_ok=True)
        if f.is_symlink():
            tmp.symlink_to(os.readlink(f))
        else:
            shutil.copy2(f, tmp)
        os.replace(tmp, dst / f.name)
    return True


def build_stock(jobs: int | None = None, force: bool = False, say=log.info) -> BuildResult:
    """The stock llama.cpp of the pinned sdist (shared libraries and the llama-quantize / llama-imatrix /
    llama-perplexity tools) for cpu_choice(), installed into llama-cpp-python's llama_cpp/lib. On a CPU that reports
    AMX the first build probes it (probe_amx). Cached in .cache/llama-cpp-python-VERSION/build under a key over
    the version and the CPU choice: a build for other instruction sets is rebuilt, never reused."""
    t0 = time.perf_counter()
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise Moeq2ggufError(f"{tool} is not installed; building llama.cpp needs cmake and a C++17 compiler")
    _, flags = cpu_features.read_cpuinfo()
    if amx_policy() == "probe" and cpu_features.reports_amx(flags) and recorded_amx_verdict() is None:
        probe_amx(jobs, say)
    choice = cpu_choice()
    say(f"llama.cpp CPU features: {choice.summary()}")
    bld = stock_build_dir()
    stamp = bld / STAMP
    key = hashlib.sha256(f"stock recipe {RECIPE} llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
                         f"{json.dumps(choice.cmake_args())}".encode()).hexdigest()
    cached = not force and stamp.is_file() and stamp.read_text().split("\n")[0] == key
    if not cached:
        stamp.unlink(missing_ok=True)
        _build_stock_tree(vendored_source(), bld, choice, STOCK_TARGETS, jobs)
        _write_atomic(stamp, f"{key}\n{choice.summary()}\n")
    if install_libs(bld / "bin", bindings_lib_dir()):
        say(f"installed the libraries into {bindings_lib_dir()}")
    return BuildResult(bld / "bin", time.perf_counter() - t0, cached)


# cuBLAS headers for nvcc 13 (ggml-cuda's common.cuh includes cublas_v2.h); the configure needs no cuBLAS library.
# This version is the CUDA 13 wheel that this project's machines can install from their package index.
CUBLAS_WHEEL = ("nvidia-cublas", "13.1.1.3")
CUDA_CHECK_DIR = "llama-patched-cudacheck"


def cublas_include_dir(download: bool = True) -> Path:
    """The include/ folder of the nvidia-cublas wheel under .cache (fetched with pip, headers only kept)."""
    name, version = CUBLAS_WHEEL
    inc = CACHE / f"cublas-{version}" / "include"
    if (inc / "cublas_v2.h").is_file():
        return inc
    if not download:
        raise Moeq2ggufError(f"no cuBLAS headers in {inc}; run tools/setup_env.sh (or cuda_compile_check()), which "
                             f"fetches the {name}=={version} wheel")
    tmp = inc.parent.with_name(inc.parent.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("downloading the %s %s wheel for its headers", name, version)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", f"{name}=={version}",
          "-d", str(tmp)], f"pip download {name}=={version}", quiet=True)
    wheels = list(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise Moeq2ggufError(f"pip download {name}=={version} left {len(wheels)} wheels in {tmp}, expected one")
    with zipfile.ZipFile(wheels[0]) as whl:
        headers = [m for m in whl.namelist() if re.fullmatch(r"nvidia/[^/]+/include/[^/]+\.h", m)]
        if not any(h.endswith("/cublas_v2.h") for h in headers):
            raise Moeq2ggufError(f"{wheels[0].name} holds no include/cublas_v2.h")
        (tmp / "include").mkdir()
        for h in headers:
            (tmp / "include" / Path(h).name).write_bytes(whl.read(h))
    wheels[0].unlink()   # ~400 MB of libraries that a compile check never links
    shutil.rmtree(inc.parent, ignore_errors=True)
    tmp.rename(inc.parent)
    return inc


def cuda_check_files(patches: list[Path], cuda_dir: Path) -> list[str]:
    """ggml-cuda translation units to compile for the ggml patches: the .cu files they change, and those of the
    folder's own .cu files that include a header they change (template-instances/ only when a patch changes them)."""
    rel = "ggml/src/ggml-cuda/"
    touched = [t[len(rel):] for p in patches if patches_ggml(p) for t in patch_targets(p) if t.startswith(rel)]
    units = {t for t in touched if t.endswith(".cu")}
    headers = [t for t in touched if t.endswith(".cuh") and "/" not in t]
    for cu in sorted(cuda_dir.glob("*.cu")):
        text = cu.read_text(errors="replace")
        if any(f'#include "{h}"' in text or f'#include "ggml-cuda/{h}"' in text for h in headers):
            units.add(cu.name)
    return sorted(units)


def _configure_cuda_check(src: Path, bld: Path, arch: str, include: Path) -> Path:
    """CMake configure of the patched tree with GGML_CUDA (no build): the compile commands CMake would run."""
    stub = bld.parent / "placeholder"
    stub.mkdir(parents=True, exist_ok=True)
    for lib in ("libcuda.so", "libcublas.so", "libcublasLt.so"):
        (stub / lib).touch()   # found by the configure, never linked: nothing is linked here
    args = ["cmake", "-S", str(src), "-B", str(bld), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CCACHE=OFF",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
            f"-DCUDA_cuda_driver_LIBRARY={stub / 'libcuda.so'}", f"-DCUDA_cublas_LIBRARY={stub / 'libcublas.so'}",
            f"-DCUDA_cublasLt_LIBRARY={stub / 'libcublasLt.so'}", f"-DCMAKE_CUDA_FLAGS=-I{include}",
            *private_cxx_runtime_args(bld.parent)]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    _run(args, "cmake configure (GGML_CUDA=ON)", quiet=True)
    commands = bld / "compile_commands.json"
    if not commands.is_file():
        raise Moeq2ggufError(f"the configure wrote no {commands}")
    return commands


def _compile_one(entry: dict) -> tuple[float, int, str]:
    """Run one compile_commands.json entry (its output folder made first); (seconds, exit code, output)."""
    cwd = Path(entry["directory"])
    argv = entry.get("arguments") or shlex.split(entry["command"])
    out = cwd / argv[argv.index("-o") + 1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)   # an object left by an earlier check proves nothing
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout


def cuda_check_key(arch: str, files: list[str] | None, patches: list[Path], nvcc: str, include: Path) -> str:
    """What a passed compile check depends on: the vendored sources (llama-cpp-python version), every patch, the
    architecture and files, nvcc's version and the cuBLAS headers' version."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(f"cuda-check {RECIPE} {LLAMA_CPP_PYTHON_VERSION} sm_{arch} {files} {include.parent.name}\n"
                       f"{version}".encode())
    _hash_patches(h, patches)
    return h.hexdigest()


def cuda_compile_check(arch: str = "90", files: list[str] | None = None, jobs: int | None = None,
                       force: bool = False) -> list[tuple[str, float]]:
    """Compile (nvcc -c, no GPU, nothing linked) the ggml-cuda sources that the ggml patches change, from the tree
    with every patch applied, with the include paths, defines and flags of a CMake configure for CUDA architecture
    `arch`. Returns (file, seconds) per translation unit; raises Moeq2ggufError naming each one that fails.
    A check that passed is remembered under cuda_check_key (out/.passed): the same patches, sources, nvcc and
    files return its times without compiling again, unless force."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise Moeq2ggufError("nvcc is not on PATH; the CUDA compile check needs the CUDA toolkit (no GPU)")
    for tool in ("cmake", "patch"):
        if shutil.which(tool) is None:
            raise Moeq2ggufError(f"{tool} is not installed; the CUDA compile check needs cmake and patch")
    include = cublas_include_dir()
    patches = build_patches(cuda=True)
    out = CACHE / CUDA_CHECK_DIR
    key = cuda_check_key(arch, files, patches, nvcc, include)
    passed = out / ".passed"
    if not force and passed.is_file():
        record = json.loads(passed.read_text())
        if record.get("key") == key:
            log.info("the CUDA compile check passed before with these patches, sources and nvcc (%s)", passed)
            return [(f, float(t)) for f, t in record["results"]]
    passed.unlink(missing_ok=True)
    src, bld = out / "src", out / "build"
    _patched_tree(src, patches)
    cuda_dir = src / "ggml" / "src" / "ggml-cuda"
    files = files or cuda_check_files(patches, cuda_dir)
    if not files:
        raise Moeq2ggufError("no runtime patch changes ggml-cuda; name the files to compile")
    commands = _configure_cuda_check(src, bld, arch, include)
    entries = {}
    for entry in json.loads(commands.read_text()):
        path = Path(entry["directory"], entry["file"]).resolve()
        if path.parent == cuda_dir.resolve() or path.parent.parent == cuda_dir.resolve():
            entries[str(path.relative_to(cuda_dir.resolve()))] = entry
    missing = [f for f in files if f not in entries]
    if missing:
        raise Moeq2ggufError(f"no compile command for {', '.join(missing)} in {commands}; known: ggml-cuda's "
                             f"{len(entries)} sources, e.g. {', '.join(sorted(entries)[:4])}")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(files)))
    log.info("compiling %s for sm_%s with %d jobs", ", ".join(files), arch, jobs)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda f: (f, *_compile_one(entries[f])), files))
    failed = []
    for f, seconds, code, output in results:
        if code != 0:
            failed.append(f"{f} (exit {code}):\n{output[-4000:]}")
        elif "warning" in output:
            log.warning("nvcc warnings in %s:\n%s", f, output[-4000:])
    if failed:
        raise Moeq2ggufError(f"nvcc ({nvcc}) failed for sm_{arch} on {len(failed)} of {len(files)} patched ggml-cuda "
                             "files:\n" + "\n".join(failed))
    _write_atomic(passed, json.dumps({"key": key, "results": [(f, seconds) for f, seconds, _, _ in results]}))
    return [(f, seconds) for f, seconds, _, _ in results]


def patched_env(lib_dir: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a process whose llama-cpp-python binds the patched llama.cpp."""
    lib_dir = lib_dir or cached_lib_dir()
    if lib_dir is None:
        raise Moeq2ggufError("the patched llama.cpp is not built; run `moeq2gguf runtime build`")
    env = dict(os.environ if base is None else base)
    env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env
