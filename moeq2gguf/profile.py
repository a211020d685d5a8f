"""Where a conversion spends its time and memory: seconds, host RSS and GPU memory per stage and layer.

    with profile.collect() as prof:          # convert(..., profile=True) does this
        ...                                   # code anywhere below calls profile.stage("gptq", layer=3)
    print(prof.table())

Stages (the names the code uses): tokenize (the calibration text, once), read (a layer's weights from the
checkpoint), forward (the calibration forward on the quantization pass, the statistics' accumulation included),
quantize (a tensor's quantization outside the stages below), statistics (sums to Hessians and their inverse
factor, once per input), gptq (the column walk), scale search (the format's fit of each block's scales), round (a
column to the frozen grid), pack (codes to bytes), write (bytes to the file); in the float pass: float forward and
plug-ins (smoothing maxima, the allocator's sensitivity, whose quantizations show as the stages above). Nested
stages count in their own line only: a stage's time excludes the stages opened inside it. Without an active
collector, stage() costs a context-variable lookup.
"""
from __future__ import annotations

import contextlib
import contextvars
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_current: contextvars.ContextVar["Profile | None"] = contextvars.ContextVar("moeq2gguf_profile", default=None)


def _rss_mib() -> float:
    """Current resident set size (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageStats:
    seconds: float = 0.0
    calls: int = 0
    rss_mib: float = 0.0        # the largest RSS seen during the stage (sampled every SAMPLE_SECONDS, and at its end)
    gpu_mib: float = 0.0        # the largest GPU memory allocated during the stage (CUDA only)


SAMPLE_SECONDS = 0.02


@dataclass
class Profile:
    stages: dict[tuple[str, int | None], StageStats] = field(default_factory=dict)
    # open stages, innermost last: [name, layer, start, child seconds, peak RSS MiB, peak GPU MiB]; a stage's peaks
    # include those of the stages inside it
    _open: list[list] = field(default_factory=list)

    def sample_rss(self) -> None:
        """Raise every open stage's RSS peak to the current RSS (collect()'s sampler thread calls this)."""
        rss = _rss_mib()
        for frame in list(self._open):
            frame[4] = max(frame[4], rss)

    def _note_gpu_peak(self) -> None:
        """Before torch's peak counter is reset (a stage opening) or read: credit its value to every open stage."""
        peak = torch.cuda.max_memory_allocated() / 2**20
        for frame in self._open:
            frame[5] = max(frame[5], peak)

    @contextlib.contextmanager
    def stage(self, name: str, layer: int | None = None) -> Iterator[None]:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            self._note_gpu_peak()
            torch.cuda.reset_peak_memory_stats()
        if layer is None and self._open:   # a stage inside a layer's stage belongs to that layer
            layer = self._open[-1][1]
        frame = [name, layer, time.perf_counter(), 0.0, 0.0, 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            if cuda:
                self._note_gpu_peak()
            self._open.pop()
            elapsed = time.perf_counter() - frame[2]
            if self._open:
                self._open[-1][3] += elapsed
            s = self.stages.setdefault((name, layer), StageStats())
            s.seconds += elapsed - frame[3]
            s.calls += 1
            s.rss_mib = max(s.rss_mib, frame[4], _rss_mib())
            s.gpu_mib = max(s.gpu_mib, frame[5])

    def totals(self) -> dict[str, StageStats]:
        out: dict[str, StageStats] = {}
        for (name, _), s in self.stages.items():
            t = out.setdefault(name, StageStats())
            t.seconds += s.seconds
            t.calls += s.calls
            t.rss_mib, t.gpu_mib = max(t.rss_mib, s.rss_mib), max(t.gpu_mib, s.gpu_mib)
        return out

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.stages if layer is not None})

    def to_dict(self) -> dict:
        per_layer = {str(b): {n: round(s.seconds, 4) for (n, layer), s in self.stages.items() if layer == b}
                     for b in self.layers()}
        # where the memory peaks: per layer, and "outside" (embedding, head, the float pass's tail)
        peaks: dict[str, list[float]] = {}
        for (_, layer), s in self.stages.items():
            p = peaks.setdefault("outside" if layer is None else str(layer), [0.0, 0.0])
            p[0], p[1] = max(p[0], s.rss_mib), max(p[1], s.gpu_mib)
        return {"stages": {n: {"seconds": round(s.seconds, 4), "calls": s.calls, "peak_rss_mib": round(s.rss_mib, 1),
                               "peak_gpu_mib": round(s.gpu_mib, 1)} for n, s in self.totals().items()},
                "per_layer_seconds": per_layer,
                "per_layer_peak_mib": {k: {"rss": round(v[0]), "gpu": round(v[1])} for k, v in peaks.items()}}

    def table(self) -> str:
        totals = self.totals()
        names = list(totals)
        lines = [f"{'stage':<14} {'seconds':>9} {'calls':>7} {'peak RSS MiB':>13} {'peak GPU MiB':>13}"]
        for n in names:
            s = totals[n]
            lines.append(f"{n:<14} {s.seconds:9.2f} {s.calls:7d} {s.rss_mib:13.0f} {s.gpu_mib:13.0f}")
        layers = self.layers()
        if layers:
            per = [n for n in names if any((n, b) in self.stages for b in layers)]
            lines.append("per layer, seconds: " + " ".join(f"{n:>12}" for n in per))
            for b in layers:
                lines.append(f"{'layer ' + str(b):<19} " + " ".join(
                    f"{self.stages[(n, b)].seconds if (n, b) in self.stages else 0.0:12.2f}" for n in per))
        return "\n".join(lines)


@contextlib.contextmanager
def collect() -> Iterator[Profile]:
    """Profile everything run inside (stage() calls anywhere below report to it). A daemon thread samples the RSS
    every SAMPLE_SECONDS, so a stage's peak counts memory it freed before it ended."""
    import threading
    prof = Profile()
    token = _current.set(prof)
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            prof.sample_rss()

    thread = threading.Thread(target=sampler, name="moeq2gguf-rss-sampler", daemon=True)
    thread.start()
    try:
        yield prof
    finally:
        stop.set()
        thread.join()
        _current.reset(token)


def stage(name: str, layer: int | None = None):
    """A timed stage of the active profile, or nothing when none is active."""
    prof = _current.get()
    return prof.stage(name, layer) if prof is not None else contextlib.nullcontext()
