"""Conversion on several processes with torch.distributed (torchrun), and the rules that keep its file identical to
a single process's.

    torchrun --nproc-per-node N [--nnodes M ...] -m moeq2gguf convert MODEL -o OUT.gguf --method moequant ...

Work split in a calibrated quantization pass (passes/quantize.py):
- calibration windows go in batches of --batch-windows (as a single process runs them); batch b is run by rank
  b mod N, which keeps those windows' hidden states: the forward is data parallel;
- every observation a batch's forward makes (a linear's input, its routing weights, its expert) is broadcast from
  the rank that ran it and replayed by every rank in global batch order, so each rank accumulates exactly the sums a
  single process accumulates, in the same order. A rank keeps the statistics of the shared tensors and of its own
  routed experts only (a contiguous share, Expert ranges below): its peak expert statistics are about 1/N of a
  layer's. (Every rank still adds every expert's tokens to the [K, K] pooled sum that rare experts fall back on.)
- each rank quantizes its own experts (GPTQ batched over them: on CPU the batched result of an expert does not
  depend on which others share the batch, tests/test_parallel.py), the shared tensors are quantized by every rank
  alike; the quantized experts are gathered to every rank (the next layer's input needs them all) and rank 0 streams
  the file.
So the file is byte-identical to a single-process conversion with the same options, for any world size.

Failure: collectives time out after MOEQ2GGUF_DIST_TIMEOUT seconds (default 300, torch's own is 10-30 minutes); a rank
that dies makes torchrun stop the others (SIGTERM), and rank 0 removes its temporary file, as for any interrupted
conversion. What needs the whole model at once in one process is refused under torchrun with the way out: --target-size
/ --target-bpw, --smooth, --expert-hadamard, --calib ebss, --refine.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def experts(self, n_experts: int) -> range:
        """This rank's contiguous share of n_experts (the first n_experts % size ranks take one more)."""
        return expert_range(n_experts, self.size, self.rank)


def expert_range(n_experts: int, size: int, rank: int) -> range:
    base, extra = divmod(n_experts, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


_WORLD: World | None = None


def world(device: str = "cpu") -> World:
    """This process's place: torchrun's environment (RANK, WORLD_SIZE, ...) starts the process group once (gloo on
    CPU, nccl on CUDA); without it, one process."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("MOEQ2GGUF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD


def _collective_failed(w: World, exc: Exception):
    from moeq2gguf.errors import Moeq2ggufError
    timeout = os.environ.get("MOEQ2GGUF_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    return Moeq2ggufError(f"rank {w.rank} of {w.size}: exchanging data with the other ranks failed ({exc}); another rank "
                          f"probably died or did not answer within MOEQ2GGUF_DIST_TIMEOUT={timeout} s. Nothing was "
                          "written; run the conversion again")


def broadcast(obj, src: int, w: World):
    """obj of rank src, on every rank (pickled: observations are CPU tensors)."""
    if not w.distributed:
        return obj
    import torch.distributed as dist
    box = [obj if w.rank == src else None]
    try:
        dist.broadcast_object_list(box, src=src)
    except Exception as exc:   # gloo / nccl errors have no common class
        raise _collective_failed(w, exc) from exc
    return box[0]


def gather_all(obj, w: World) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not w.distributed:
        return [obj]
    import torch.distributed as dist
    out = [None] * w.size
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:
        raise _collective_failed(w, exc) from exc
    return out


class Recorder:
    """An nn.Observer that keeps every observation of one batch's forward, in order, on the CPU (to be broadcast)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def observe(self, name: str, x: torch.Tensor, token_weight: torch.Tensor | None, expert: int | None) -> None:
        self.calls.append((name, x.detach().cpu(), None if token_weight is None else token_weight.detach().cpu(), expert))


def replay(calls: list[tuple], observer) -> None:
    for name, x, token_weight, expert in calls:
        observer.observe(name, x, token_weight, expert)


def refuse_unsupported(config) -> None:
    """What a distributed conversion cannot do yet, with the way out."""
    from moeq2gguf.errors import Moeq2ggufError
    unsupported = [flag for flag, on in (("--target-size/--target-bpw", config.targeted), ("--smooth", config.smooth),
                                         ("--expert-hadamard", config.expert_hadamard),
                                         ("--calib ebss", config.quant.calib == "ebss"),
                                         ("--refine", config.refine)) if on]
    if unsupported:
        raise Moeq2ggufError(f"{', '.join(unsupported)} is not distributed yet; run this conversion as one process "
                             "(without torchrun)")

