"""Orchestration of a conversion: checkpoint -> adapter -> typed tensors -> GGUF.

The tensor infos of the whole file are declared first (from the checkpoint's headers, no data
read), then tensors are produced one at a time in file order and streamed to a temporary file
that is renamed when complete, so memory holds one tensor group and an interrupted run leaves
nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from moeq2gguf import plan
from moeq2gguf.plan import alloc
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.plan.mixes import parse_override
from moeq2gguf.models.registry import open_model
from moeq2gguf.quant.engine import CALIBRATED, QuantConfig, QuantReport, quantized_stream
from moeq2gguf.transforms import smoothing
from moeq2gguf.transforms.rotate import check_seed, random_rotation, rotate_sources
from moeq2gguf.io.vocab import load_vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    n_tensors: int
    n_bytes: int
    seconds: float
    peak_rss_mib: float
    report: QuantReport | None = None
    allocation: alloc.Allocation | None = None   # the recipe chosen for a size target


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


# --method moequant rotates the residual stream unless told not to: on the bundled reference models it had the
# lowest mean KLD ratio to llama.cpp imatrix of {gptq, moequant} x {none, rotate, smooth, rotate+smooth}
# (BENCHMARKS.md, "moequant's default recipe").
METHODS_ROTATED_BY_DEFAULT = frozenset({"moequant"})


def default_rotate(method: str, type_name: str, imatrix: str | None, sources: list) -> bool:
    """Whether a conversion that did not say --rotate / --no-rotate rotates. Not where rotation would lose
    something: a checkpoint holding GGML blocks (GPT-OSS MXFP4 experts, otherwise copied bit for bit), or an
    --imatrix FILE (statistics of the unrotated model)."""
    return (method in METHODS_ROTATED_BY_DEFAULT and not plan.is_float(type_name) and imatrix is None
            and not any(s.raw_qtype is not None for s in sources))


def convert(model_dir: str | os.PathLike[str], output: str | os.PathLike[str], type: str = "F16",
            method: str = "rtn", calib: str | None = None, device: str = "cpu", tensor_types: tuple[str, ...] = (),
            imatrix: str | None = None, calib_windows: int = 32, calib_ctx: int = 512,
            rotate: bool | None = None, rotate_seed: int | None = None, target_size: str | int | None = None,
            target_bpw: float | None = None, smooth: str | None = None, expert_hadamard: bool = False,
            progress: bool = True) -> ConvertResult:
    """Convert a Hugging Face MoE checkpoint directory to a GGUF file llama.cpp runs.

    type: F32 | F16 | BF16, or a llama.cpp mix (Q4_K_M, Q3_K_M, Q2_K, Q4_0, Q8_0, IQ4_XS, ...)
    method: rtn | imatrix | gptq | moequant; calib: a split name (default calib) or a .txt/.jsonl path;
    tensor_types: llama-quantize style REGEX=TYPE overrides; imatrix: a llama-imatrix GGUF file;
    rotate: fold the norms and rotate the residual stream by a seeded orthogonal Q (transforms/rotate.py),
    exact in float, with any type and method; None: the method's default (on for moequant, see default_rotate);
    rotate_seed: its seed (default 0);
    target_size ('6GiB', '3.5GB', bytes) / target_bpw: instead of --type, choose every tensor's type to fit the
    file (or llama.cpp's bits per weight) in that budget with the least predicted loss (alloc.py);
    smooth='aggregate' / 'down' / 'aggregate,down': EAQuant's smoothing aggregation into the FFN norm / per-expert
    down-projection scaling (transforms/smoothing.py), exact in float, stock llama.cpp, from a float calibration pass;
    smooth='per-expert' / expert_hadamard: per-expert input smoothing / the expert Hadamard (transforms/patched.py),
    exact in float; the file then needs the patched llama.cpp (`moeq2gguf runtime build`)."""
    t0 = time.time()
    targeted = target_size is not None or target_bpw is not None
    if targeted:
        type = alloc.check_request(type, target_size, target_bpw, imatrix)
    type_name = plan.validate_type(type)
    cfg = QuantConfig(method=method, calib=calib or "calib", device=device, imatrix_file=imatrix,
                      n_windows=calib_windows, ctx=calib_ctx)
    if plan.is_float(type_name) and (method != "rtn" or imatrix):
        raise Moeq2ggufError(f"--method {method} / --imatrix quantize weights; pick a quantized --type such as Q4_K_M")
    if imatrix and method != "rtn":
        raise Moeq2ggufError("--imatrix FILE replaces our statistics; use it with --method rtn (the default)")
    if rotate_seed is not None and rotate is False:
        raise Moeq2ggufError("--rotate-seed has no effect without --rotate; add --rotate or drop the seed")
    seed = check_seed(0 if rotate_seed is None else rotate_seed)
    if rotate and imatrix:
        raise Moeq2ggufError("--imatrix FILE holds statistics of the unrotated model, which do not apply to rotated "
                             "weights; with --rotate use --method imatrix (statistics collected on the rotated model)")
    stock_smooth, patched_smooth = smoothing.parse(smooth)
    if stock_smooth and expert_hadamard:
        raise Moeq2ggufError(f"--smooth {smooth} does not combine with --expert-hadamard in this version; choose one")
    if stock_smooth and imatrix:
        raise Moeq2ggufError(f"--imatrix FILE holds statistics of the unsmoothed model, which do not apply to the "
                             f"weights --smooth {smooth} scales; use --method imatrix (statistics of the smoothed model)")
    expert_tf = None
    if patched_smooth or expert_hadamard:   # files for the patched llama.cpp (runtime_patches/)
        from moeq2gguf.transforms import patched
        expert_tf = patched.ExpertTransforms(smooth=next(iter(patched_smooth), None), hadamard=expert_hadamard)
    if expert_tf is not None and (imatrix or targeted):
        raise Moeq2ggufError("--smooth per-expert / --expert-hadamard change the expert weights and inputs: an --imatrix "
                             "FILE (statistics of the untransformed model) or a size target does not apply; use --method "
                             "with --type")
    overrides = [parse_override(t) for t in tensor_types]
    output = Path(output)
    if not output.parent.is_dir():
        raise Moeq2ggufError(f"output folder {output.parent} does not exist; create it or choose another -o path")
    if output.is_dir():
        raise Moeq2ggufError(f"-o {output} is a directory; give a file name such as {output / 'model.gguf'}")

    adapter = open_model(model_dir)
    spec = adapter.spec
    sources = adapter.all_tensors()
    adapter.check_all_used(sources)
    if rotate is None:
        rotate = default_rotate(method, type_name, imatrix, sources)
        if rotate_seed is not None and not rotate:
            raise Moeq2ggufError(f"--rotate-seed has no effect without --rotate (--method {method} does not rotate "
                                 f"by default here); add --rotate or drop the seed")
    rotation = None
    if rotate:
        rotation = random_rotation(spec.hidden_size, seed)
        sources = rotate_sources(sources, spec, rotation)
    if stock_smooth:   # after the rotation, whose norm folding would cancel aggregate's 1/s (transforms/smoothing.py)
        sources = smoothing.apply(adapter, sources, stock_smooth, cfg.calib, cfg.n_windows, cfg.ctx, device)
    add_expert_metadata = None
    if expert_tf is not None:   # after the rotation: smoothing is measured on the rotated model
        sources, add_expert_metadata = patched.apply(adapter, sources, expert_tf, cfg.calib, cfg.n_windows, cfg.ctx,
                                                     device)
    vocab = load_vocab(adapter.reader.model_dir, spec.vocab_size, adapter.config, adapter.default_pre_tokenizer)
    has_imatrix = method in CALIBRATED or imatrix is not None
    types = plan.assign(sources, type_name, spec, has_imatrix, overrides)
    budget = alloc.make_budget(sources, target_size, target_bpw) if targeted else None
    if budget is not None:
        type_name = alloc.nearest_mix(sources, spec, budget)  # general.file_type: llama.cpp only displays it
    allocation = None
    report = QuantReport()

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(None, adapter.arch_name)
    try:
        writer.add_name(Path(model_dir).resolve().name)
        writer.add_file_type(plan.file_type(type_name))
        if not plan.is_float(type_name):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_string("moeq2gguf.method", "imatrix-file" if imatrix else method)
            writer.add_string("moeq2gguf.type", type_name if budget is None else f"target {budget.label}")
        if rotation is not None:
            writer.add_string("moeq2gguf.rotation", rotation.kind)
            writer.add_uint64("moeq2gguf.rotation_seed", rotation.seed)
        if stock_smooth:
            smoothing.add_metadata(writer, stock_smooth)
        adapter.add_arch_metadata(writer)
        if add_expert_metadata is not None:
            add_expert_metadata(writer)
        vocab.add_to(writer)
        if budget is not None:  # every other key is in the writer now: the file size is exact
            allocation = alloc.allocate(writer, adapter, sources, overrides, cfg, budget, progress)
            types = allocation.types
        n_bytes = 0
        for source, qtype in zip(sources, types):
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = int(np.prod(source.shape)) * np.dtype(dtype).itemsize
                writer.add_tensor_info(source.name, source.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = _byte_shape(source.shape, qtype)
                nbytes = int(np.prod(byte_shape))
                writer.add_tensor_info(source.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            n_bytes += nbytes
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        n_written = 0
        for data in quantized_stream(adapter, sources, types, cfg, report, progress):
            writer.write_tensor_data(data)
            n_written += 1
        assert n_written == len(sources)
        writer.close()
        if allocation is not None:
            alloc.check_written(tmp, allocation, n_bytes)
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        adapter.reader.close()
    if report.coverage:
        _write_json(Path(f"{output}.coverage.json"), report.coverage)
    result = ConvertResult(output, len(sources), n_bytes, time.time() - t0, _peak_rss_mib(), report, allocation)
    log.info("wrote %s: %d tensors, %.1f MiB in %.1f s, peak RSS %.0f MiB", output, result.n_tensors,
             n_bytes / 2**20, result.seconds, result.peak_rss_mib)
    return result
