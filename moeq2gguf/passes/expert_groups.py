"""How many routed experts of a layer the quantization pass treats at once, and whether their weights stay on the host.

All of a layer's experts at once is fastest (one batched GPTQ), but a layer's per-expert Hessians and GPTQ work grow
with E x K^2: DeepSeek-V3's 256 experts of 7168 x 2048 need about 57 GB of fp32 Hessians alone, and its expert
weights 45 GB in fp32 (twice that with their dequantized copies). When a layer would not fit the device's free memory,
the pass takes its experts in groups: one float forward keeps the FFN's normed input and routing of every calibration
batch, then each group's statistics are collected from those (nn.routed_experts), its GPTQ runs, and its statistics are
freed. Every expert's sums are accumulated in the same order as in one pass, so the file is byte-identical
(tests/quant/test_engine.py). On a GPU, when keeping the expert stacks in host memory at least doubles the group, they
stay there and move one expert (forward) or one group (GPTQ) at a time.

The estimate is rough (fp32 bytes of the weights, their dequantized copies, the Hessians and GPTQ's work arrays per
expert; not the hidden states); the budget is a fraction of what the device has free when the layer starts.
`python tools/bench_scale.py --plan 80GB --device cuda` prints what it chooses for the real models' shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moeq2gguf.models.base import TensorSource
from moeq2gguf.quant.gptq import FACTOR_CHUNK_BYTES

BUDGET_FRACTION = 0.8       # of the device's free memory at the start of a layer
F32 = 4


@dataclass(frozen=True)
class ExpertGrouping:
    size: int                   # experts per group
    host_stacks: bool           # the layer's expert weight stacks stay in host memory (a GPU device only)
    stacks: tuple[str, ...]     # GGUF names of the stacks quantized in groups
    fits: bool = True           # False: even one expert at a time exceeds the budget (expect to run out of memory)


def routed_stacks(block, copied: set[str]) -> list[TensorSource]:
    """The layer's routed expert weight stacks [E, R, K] that get quantized (not copied from the checkpoint)."""
    return [s for s in block if s.role == "expert" and len(s.shape) == 3 and s.name not in copied]


def layer_bytes(stacks: list[TensorSource], full_statistics: bool) -> tuple[int, int]:
    """(bytes of the expert stacks' weights and dequantized copies, bytes per expert of statistics + GPTQ work)."""
    weights = sum(2 * F32 * s.shape[0] * s.shape[1] * s.shape[2] for s in stacks)
    inputs = {s.shape[2] for s in stacks}   # gate/up share the layer input, down reads the FFN width
    stats = sum(F32 * k * k if full_statistics else 3 * 8 * k for k in inputs)
    # GPTQ of one tensor: the normalised Hessian and its inverse factor (fp32; the factorisation's float64
    # temporaries are bounded apart, quant/gptq.FACTOR_CHUNK_BYTES) and about eight weight-sized arrays (the walk's
    # copy, values, codes, the RTN reference, the error products)
    work = max((2 * F32 * s.shape[2] ** 2 if full_statistics else 0) + 8 * F32 * s.shape[1] * s.shape[2]
               for s in stacks)
    return weights, stats + work


def free_bytes(device: torch.device) -> int:
    """Memory the device can still give: CUDA's free memory plus what torch's cache holds unused; on the CPU the
    kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(stacks: list[TensorSource], n_experts: int, full_statistics: bool, device: torch.device,
         requested: int | None, available: int | None = None) -> ExpertGrouping | None:
    """None: all experts at once, weights on the device (the fast path). requested: --expert-group N (a size), else
    chosen from `available` bytes (default: the device's free memory now)."""
    if not stacks or n_experts < 2:
        return None
    names = tuple(s.name for s in stacks)
    weights, per_expert = layer_bytes(stacks, full_statistics)
    budget = BUDGET_FRACTION * (free_bytes(device) if available is None else available) - 3 * FACTOR_CHUNK_BYTES
    if requested is not None:
        size = max(1, min(requested, n_experts))
        host = device.type == "cuda" and weights + size * per_expert > budget
        return ExpertGrouping(size, host, names) if size < n_experts or host else None
    if weights + n_experts * per_expert <= budget:
        return None
    # on a GPU, the expert weights go to the host when that at least doubles the group (fewer, larger groups: each
    # group costs a pass over its tokens, the host copy one transfer per expert)
    beside, alone = int((budget - weights) // per_expert), int(budget // per_expert)
    host = device.type == "cuda" and alone > 2 * max(beside, 0)
    size = alone if host else beside
    return ExpertGrouping(max(1, min(size, n_experts)), host, names, fits=size >= 1)
