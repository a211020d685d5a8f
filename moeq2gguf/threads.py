"""Thread pools that behave when the machine is shared.

OpenMP's default wait policy lets idle worker threads spin on their cores; with two processes on two cores
(two conversions, or a test and its subprocess) the spinning threads starve each other: measured 17x slower
(docs/PLATFORMS.md). torch's libgomp, numba's OpenMP layer and llama.cpp's OpenMP build all read
OMP_WAIT_POLICY when the runtime loads, so `prefer_passive_waiting()` runs when the package is imported,
before torch. `set_threads(n)` is the one thread count for torch, numba and llama.cpp (the CLI's --threads):
default, the cores this process may run on (its affinity mask), not every core of the machine.
"""
from __future__ import annotations

import os
import sys

_threads: int | None = None


def available_cores() -> int:
    """The cores this process may use (taskset, cgroup cpusets), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy: idle OpenMP threads sleep instead of spinning.
    Effective only before an OpenMP runtime is loaded; inherited by child processes (workers, llama.cpp tools)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(n: int | None = None) -> int:
    """Use n threads (default: available_cores()) in torch, numba and llama.cpp, here and in child processes."""
    from moeq2gguf.errors import Moeq2ggufError
    if n is not None and n < 1:
        raise Moeq2ggufError(f"--threads {n}: give a positive number of threads (this process may use "
                             f"{available_cores()} cores)")
    global _threads
    _threads = n or available_cores()
    os.environ["OMP_NUM_THREADS"] = str(_threads)   # torch's default in child processes and OpenMP tools
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(_threads, numba.config.NUMBA_NUM_THREADS))
    return _threads


def threads() -> int:
    """The thread count set by set_threads(), else the cores this process may use."""
    return _threads or available_cores()
