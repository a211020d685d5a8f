"""Which instruction sets a llama.cpp build may use on this machine, chosen explicitly.

llama.cpp's default CPU build (GGML_NATIVE=ON: -march=native) compiles in whatever the compiler finds,
AMX included, and at the pinned llama.cpp ggml's AMX kernels die with SIGILL on some AMX Xeons
(docs/PLATFORMS.md). So every build this project makes passes GGML_NATIVE=OFF and one ON/OFF per ggml
x86 option, from the flags /proc/cpuinfo reports, with AMX only where the self-check ran ggml's AMX matmul
(moeq2gguf.runtime.selfcheck) on that build. The choice is printed and is part of each build's cache key.

Standard library only: set-up runs it before the package's dependencies are installed.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

# ggml's x86 CMake options (ggml/CMakeLists.txt at the pinned commit) and the /proc/cpuinfo flags each needs;
# GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw, so it needs all five.
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
# ggml compiles its AMX matmul only with AMX-INT8 and AVX512-VNNI (ggml-cpu/amx/amx.h)
AMX_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_AMX_TILE", ("amx_tile",)),
    ("GGML_AMX_INT8", ("amx_int8",)),
    ("GGML_AMX_BF16", ("amx_bf16",)),
)
X86_MACHINES = frozenset({"x86_64", "amd64", "AMD64", "i686", "i386"})


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", {}) where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def reports_amx(flags: frozenset[str]) -> bool:
    """Whether the CPU reports what ggml's AMX matmul needs (then a probe decides whether a build keeps it)."""
    return {"amx_tile", "amx_int8", "avx512_vnni"} <= flags


@dataclass(frozen=True)
class CpuChoice:
    """The instruction sets one llama.cpp build is compiled for."""
    model: str
    machine: str
    options: tuple[tuple[str, bool], ...]   # empty: not x86, ggml's portable baseline for the architecture
    amx: str                                # why AMX is on or off, in words

    def cmake_args(self) -> list[str]:
        """GGML_NATIVE=OFF always (never -march=native: the binaries must run on other CPUs of the architecture),
        then one ON/OFF per x86 instruction set."""
        return ["-DGGML_NATIVE=OFF"] + [f"-D{name}={'ON' if on else 'OFF'}" for name, on in self.options]

    @property
    def enabled(self) -> list[str]:
        return [name.removeprefix("GGML_") for name, on in self.options if on]

    @property
    def amx_on(self) -> bool:
        return any(on for name, on in self.options if name.startswith("GGML_AMX"))

    def summary(self) -> str:
        if not self.options:
            return f"{self.model or self.machine}: ggml's portable baseline for this architecture (not x86-64)"
        return f"{self.model or self.machine}: {' '.join(self.enabled) or 'no SIMD extensions'}; AMX {self.amx}"

    def key(self) -> str:
        """What a build's cache key takes from the choice (a build with other flags is never reused)."""
        return hashlib.sha256(json.dumps([self.machine, list(self.options)]).encode()).hexdigest()[:16]


def choose(flags: frozenset[str], model: str = "", machine: str | None = None,
           amx_probe: bool | None = None) -> CpuChoice:
    """Every ggml x86 option the CPU reports, AMX only when amx_probe is True (a probe ran ggml's AMX matmul on
    this machine); None: no probe ran, so AMX stays off."""
    machine = machine or platform.machine()
    if machine not in X86_MACHINES:
        return CpuChoice(model, machine, (), "n/a")
    options = [(name, set(needs) <= flags) for name, needs in X86_OPTIONS]
    if not reports_amx(flags):
        amx, use_amx = "off (not reported by this CPU)", False
    elif amx_probe is True:
        amx, use_amx = "on (the probe ran ggml's AMX matmul on this machine)", True
    elif amx_probe is False:
        amx, use_amx = "off (reported, but ggml's AMX matmul failed the probe on this machine)", False
    else:
        amx, use_amx = "off (reported, not probed)", False
    options += [(name, use_amx and set(needs) <= flags) for name, needs in AMX_OPTIONS]
    return CpuChoice(model, machine, tuple(options), amx)


def this_machine(amx_probe: bool | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> CpuChoice:
    model, flags = read_cpuinfo(cpuinfo)
    return choose(flags, model, amx_probe=amx_probe)


def probe_key(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """What an AMX probe verdict is valid for: this CPU model and its flags (a different machine probes again)."""
    model, flags = read_cpuinfo(cpuinfo)
    return hashlib.sha256(json.dumps([model, platform.machine(), sorted(flags)]).encode()).hexdigest()[:16]


if __name__ == "__main__":
    print(this_machine().summary())
