"""Runs on every x86-64 machine: explicit CPU features for llama.cpp builds (AMX only after a probe), the
self-check that turns a SIGILL into one clear message, and thread settings that behave on a shared machine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moeq2gguf import threads
from moeq2gguf.runtime import cpu_features
from moeq2gguf.runtime import build as runtime_build
from moeq2gguf.runtime import selfcheck
from moeq2gguf.errors import Moeq2ggufError

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2"
AVX512 = "avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16"
EPYC = frozenset(f"{BASE} {AVX512}".split())                                   # AMD EPYC (Zen 4): no AMX
SAPPHIRE_RAPIDS = frozenset(f"{BASE} {AVX512} avx_vnni amx_tile amx_int8 amx_bf16".split())


def options(choice) -> dict[str, bool]:
    return dict(choice.options)


def test_every_reported_feature_is_on_and_native_is_off():
    choice = cpu_features.choose(EPYC, "AMD EPYC", machine="x86_64")
    args = choice.cmake_args()
    assert args[0] == "-DGGML_NATIVE=OFF"
    on = options(choice)
    assert on["GGML_AVX2"] and on["GGML_AVX512"] and on["GGML_AVX512_VNNI"] and on["GGML_AVX512_BF16"]
    assert not on["GGML_AVX_VNNI"] and not on["GGML_AMX_INT8"]
    assert "-DGGML_AMX_TILE=OFF" in args and "-DGGML_AVX512=ON" in args
    assert "not reported" in choice.amx


def test_avx512_needs_all_five_subsets():
    choice = cpu_features.choose(EPYC - {"avx512bw"}, machine="x86_64")
    assert not options(choice)["GGML_AVX512"]
    assert options(choice)["GGML_AVX2"]


def test_amx_stays_off_unless_the_probe_passed():
    unprobed = cpu_features.choose(SAPPHIRE_RAPIDS, "Xeon", machine="x86_64", amx_probe=None)
    failed = cpu_features.choose(SAPPHIRE_RAPIDS, "Xeon", machine="x86_64", amx_probe=False)
    passed = cpu_features.choose(SAPPHIRE_RAPIDS, "Xeon", machine="x86_64", amx_probe=True)
    for choice in (unprobed, failed):
        assert not choice.amx_on and "-DGGML_AMX_INT8=OFF" in choice.cmake_args()
        assert options(choice)["GGML_AVX512_VNNI"] and options(choice)["GGML_AVX_VNNI"]
    assert passed.amx_on and "-DGGML_AMX_INT8=ON" in passed.cmake_args()
    assert len({unprobed.key(), passed.key()}) == 2 and unprobed.key() == failed.key()
    assert "failed the probe" in failed.summary() and "probe ran" in passed.summary()


def test_other_architectures_build_portably_too():
    choice = cpu_features.choose(frozenset({"fp", "asimd"}), machine="aarch64")
    assert choice.cmake_args() == ["-DGGML_NATIVE=OFF"]   # never -march=native, whatever the architecture


def test_cpuinfo_is_parsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx2 amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = cpu_features.read_cpuinfo(info)
    assert model == "Intel(R) Xeon(R) Platinum 8481C" and flags == {"fpu", "avx2", "amx_tile"}
    assert cpu_features.read_cpuinfo(tmp_path / "missing") == ("", frozenset())


class FakeStockBuild:
    """build_stock() with the compiler, the child and the install faked: which choices were built, was it probed."""

    def __init__(self, monkeypatch, tmp_path, flags, probe_ok: bool):
        self.builds: list[tuple[cpu_features.CpuChoice, tuple[str, ...]]] = []
        self.probes = 0
        monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda path="/proc/cpuinfo": ("Test CPU", flags))
        monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(runtime_build, "AMX_VERDICT", tmp_path / "amx-probe.json")
        monkeypatch.setattr(runtime_build, "stock_build_dir", lambda: tmp_path / "build")
        monkeypatch.setattr(runtime_build, "vendored_source", lambda: tmp_path / "src")
        monkeypatch.setattr(runtime_build, "install_libs", lambda src, dst: False)
        monkeypatch.setattr(runtime_build, "bindings_lib_dir", lambda: tmp_path / "lib")
        monkeypatch.delenv("MOEQ2GGUF_AMX", raising=False)

        def build_tree(src, bld, choice, targets, jobs):
            self.builds.append((choice, targets))
            bld.mkdir(parents=True, exist_ok=True)

        def run_child(lib_dir=None, threads=None, timeout=0):
            self.probes += 1
            code = 0 if probe_ok else -signal.SIGILL
            return selfcheck.CheckResult(probe_ok, str(lib_dir), code, "ok" if probe_ok else "", 0.1)

        monkeypatch.setattr(runtime_build, "_build_stock_tree", build_tree)
        monkeypatch.setattr(selfcheck, "run_child", run_child)


@pytest.mark.parametrize("probe_ok", [False, True])
def test_the_amx_probe_decides_and_is_remembered(monkeypatch, tmp_path, probe_ok):
    fake = FakeStockBuild(monkeypatch, tmp_path, SAPPHIRE_RAPIDS, probe_ok)
    said = []
    runtime_build.build_stock(say=said.append)
    assert fake.probes == 1
    (probe_choice, probe_targets), (final_choice, final_targets) = fake.builds
    assert probe_choice.amx_on and probe_targets == ("llama", "ggml")
    assert final_choice.amx_on is probe_ok and final_targets == runtime_build.STOCK_TARGETS
    assert json.loads(runtime_build.AMX_VERDICT.read_text())["works"] is probe_ok
    assert any(line.startswith("llama.cpp CPU features:") and ("AMX on" in line) is probe_ok for line in said), said
    # a second set-up on this machine reuses the verdict and the build: no probe, no compile
    again = runtime_build.build_stock(say=said.append)
    assert again.cached and fake.probes == 1 and len(fake.builds) == 2
    assert runtime_build.cpu_choice().amx_on is probe_ok


def test_a_build_for_other_features_is_rebuilt(monkeypatch, tmp_path):
    fake = FakeStockBuild(monkeypatch, tmp_path, SAPPHIRE_RAPIDS, probe_ok=False)
    runtime_build.build_stock(say=lambda line: None)
    assert len(fake.builds) == 2
    # another machine (or the verdict gone): the recorded key no longer matches, so it probes and builds again
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda path="/proc/cpuinfo": ("Test CPU", EPYC))
    runtime_build.build_stock(say=lambda line: None)
    assert len(fake.builds) == 3 and not fake.builds[-1][0].amx_on
    assert fake.probes == 1   # no AMX reported: nothing to probe


def test_no_probe_when_amx_is_turned_off(monkeypatch, tmp_path):
    fake = FakeStockBuild(monkeypatch, tmp_path, SAPPHIRE_RAPIDS, probe_ok=True)
    monkeypatch.setenv("MOEQ2GGUF_AMX", "off")
    runtime_build.build_stock(say=lambda line: None)
    assert fake.probes == 0 and not fake.builds[0][0].amx_on
    monkeypatch.setenv("MOEQ2GGUF_AMX", "yes")
    with pytest.raises(Moeq2ggufError, match="MOEQ2GGUF_AMX='yes'"):
        runtime_build.build_stock(say=lambda line: None)


def test_the_stock_build_was_made_for_this_cpu():
    """The libraries that llama-cpp-python runs in this test session: built by build_stock for cpu_choice()."""
    stamp = runtime_build.stock_build_dir() / runtime_build.STAMP
    assert stamp.is_file(), "set-up (moeq2gguf runtime build --stock) has not built llama.cpp here"
    assert stamp.read_text().split("\n")[1] == runtime_build.cpu_choice().summary()
    cache = (runtime_build.stock_build_dir() / "CMakeCache.txt").read_text()
    for arg in runtime_build.cpu_choice().cmake_args():
        name, value = arg.removeprefix("-D").split("=")
        assert f"{name}:BOOL={value}" in cache, arg


def test_self_check_passes_on_the_installed_llama_cpp():
    result = selfcheck.check()
    assert result.ok and result.output.startswith("ok:"), result


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from moeq2gguf.cli import main; sys.exit(main())", *argv],
                          capture_output=True, text=True, env=env)


def _faulting_library(folder: Path, body: str) -> Path:
    """A libllama.so whose load-time constructor runs `body`: a library that dies as soon as it is used."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a faulting library (set-up needs one for llama.cpp anyway)")
    folder.mkdir()
    (folder / "fault.c").write_text(f"__attribute__((constructor)) static void fault(void) {{ {body} }}\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / "libllama.so"), str(folder / "fault.c")], check=True)
    return folder


def test_an_illegal_instruction_gives_one_clear_message(tmp_path):
    lib = _faulting_library(tmp_path / "sigill", "__builtin_trap();")   # ud2 on x86: SIGILL
    result = selfcheck.run_child(lib)
    assert not result.ok and result.signal_name == "SIGILL"
    proc = _cli("runtime", "check", "--lib-dir", str(lib))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("moeq2gguf: error: llama.cpp stopped with an illegal instruction (SIGILL)")
    assert str(lib) in lines[0] and "Fix:" in lines[0] and "-DGGML_NATIVE=OFF" in lines[0]


def test_other_crashes_name_the_signal(tmp_path):
    lib = _faulting_library(tmp_path / "segv", "*(volatile int *)0 = 1;")
    proc = _cli("runtime", "check", "--lib-dir", str(lib))
    assert proc.returncode == 2 and "crashed (SIGSEGV)" in proc.stderr and "Traceback" not in proc.stderr


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    import numba
    import torch
    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert threads.available_cores() == 1 and threads.threads() == 1
    before_torch, before_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert threads.set_threads(None) == 1
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        with pytest.raises(Moeq2ggufError, match="--threads 0"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(before_torch)
        numba.set_num_threads(before_numba)


def test_importing_the_package_makes_openmp_threads_wait_passively():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, moeq2gguf, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"   # a user's own choice is kept
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "ACTIVE"


def test_the_sdist_pin_is_the_same_in_setup_and_in_the_package():
    setup = (Path(__file__).resolve().parents[1] / "tools" / "setup_env.sh").read_text()
    assert f"SDIST_SHA256={runtime_build.SDIST_SHA256}" in setup
    sdist = runtime_build._sdist_dir() / "sdist" / f"llama_cpp_python-{runtime_build.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if sdist.is_file():   # set-up downloaded it: it is the pinned file
        runtime_build.check_sdist(sdist)


def test_a_different_sdist_is_refused_and_deleted(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(Moeq2ggufError, match="not the pinned"):
        runtime_build.check_sdist(fake)
    assert not fake.exists()


@pytest.mark.parametrize("has_filter", [True, False], ids=["tarfile filter", "older Python"])
def test_sdist_extraction_refuses_paths_outside(tmp_path, monkeypatch, has_filter):
    import io
    import tarfile
    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    for path, name in ((good, "pkg/vendor/ok.txt"), (bad, "pkg/../../escape.txt")):
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
    with tarfile.open(good) as tar:
        runtime_build.safe_extract(tar, tar.getmembers(), tmp_path / "out")
    assert (tmp_path / "out" / "pkg" / "vendor" / "ok.txt").read_text() == "ok"
    with tarfile.open(bad) as tar, pytest.raises((Moeq2ggufError, tarfile.TarError)):
        runtime_build.safe_extract(tar, tar.getmembers(), tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()
