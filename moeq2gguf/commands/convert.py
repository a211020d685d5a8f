"""Orchestration of a conversion: checkpoint -> adapter -> typed tensors -> GGUF.

The tensor infos of the whole file are declared first (from the checkpoint's headers, no data
read), then tensors are produced one at a time in file order and streamed to a temporary file
that is renamed when complete, so memory holds one tensor group and an interrupted run leaves
nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tqdm import tqdm

from moeq2gguf import parallel, plan
from moeq2gguf import profile as profiling
from moeq2gguf.config import ConvertConfig
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.io.hub import model_display_name, resolve_model
from moeq2gguf.io.vocab import load_vocab
from moeq2gguf.models.registry import open_model
from moeq2gguf.passes.calibration import float_pass
from moeq2gguf.passes.layers import Layers
from moeq2gguf.passes.quantize import QuantReport, quantized_stream
from moeq2gguf.plan import alloc
from moeq2gguf.quant import sensitivity as sens
from moeq2gguf.transforms import smoothing
from moeq2gguf.transforms.rotate import random_rotation, rotate_sources

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
    profile: profiling.Profile | None = None     # seconds and memory per stage and layer (convert(profile=True))

    def to_dict(self) -> dict:
        """The summary `convert --json` prints."""
        import collections
        types = collections.Counter(t["type"] for t in (self.report.tensors.values() if self.report else ()))
        methods_used = collections.Counter(t.get("method") for t in (self.report.tensors.values() if self.report else ()))
        fallbacks = collections.Counter(f for c in (self.report.coverage.values() if self.report else ())
                                        for f in c["fallback"])
        return {"output": str(self.output), "bytes": self.n_bytes, "mib": round(self.n_bytes / 2**20, 3),
                "tensors": self.n_tensors, "seconds": round(self.seconds, 3), "peak_rss_mib": round(self.peak_rss_mib),
                "types": dict(types), "methods": dict(methods_used),
                "expert_coverage": dict(fallbacks),   # own / blended / pooled Hessians over experts and tensors
                "expert_statistics_peak_mib": round(self.report.expert_stats_peak_bytes / 2**20, 3) if self.report else 0,
                # layers whose routed experts went in groups (passes/expert_groups.py): layer -> experts per group
                "expert_groups": {str(b): n for b, n in self.report.expert_groups.items()} if self.report else {},
                "recipe": json.loads(self.allocation.recipe_json()) if self.allocation else None,
                "profile": self.profile.to_dict() if self.profile else None}


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


def remove_stale_temps(output: Path) -> None:
    """Remove the temporary files (.OUT.gguf.PID.tmp) that runs killed before they could clean up (SIGKILL, the
    OOM killer, a power cut) left next to this output; a live process's one is left alone and named."""
    import re
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(\d+)(\.tmp|-\d{{5}}-of-\d{{5}}\.gguf)")   # file or split part
    for tmp in output.parent.glob(f".{output.name}.*"):
        match = pattern.fullmatch(tmp.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        pid = match.group(1)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.warning("removing %s (%.1f MiB), left by an interrupted conversion (process %s)", tmp,
                        tmp.stat().st_size / 2**20, pid)
            tmp.unlink(missing_ok=True)
        except PermissionError:   # another user's live process
            log.warning("%s belongs to process %s, which is still running and writes the same output", tmp, pid)
        else:
            log.warning("%s belongs to process %s, which is still running and writes the same output", tmp, pid)


def default_rotate(config: ConvertConfig, sources: list) -> bool:
    """Whether a conversion that did not say --rotate / --no-rotate rotates: where the method rotates by default,
    and not where rotation would lose something: a checkpoint holding GGML blocks (GPT-OSS MXFP4 experts, otherwise
    copied bit for bit), or an --imatrix FILE (statistics of the unrotated model)."""
    return (config.method_impl.rotates_by_default and not plan.is_float(config.type_name) and config.imatrix is None
            and not any(s.raw_qtype is not None for s in sources))


def convert(model_dir: str | os.PathLike[str], output: str | os.PathLike[str], config: ConvertConfig | None = None,
            *, progress: bool = True, profile: bool = False, **options) -> ConvertResult:
    """Convert a Hugging Face MoE checkpoint directory to a GGUF file llama.cpp runs.

    config: a ConvertConfig, or its fields as keywords (type="Q4_K_M", method="moequant", ...):
    type: F32 | F16 | BF16, or a llama.cpp mix (Q4_K_M, Q3_K_M, Q2_K, Q4_0, Q8_0, IQ4_XS, ...)
    method: a registered method (rtn | imatrix | gptq | moequant | ...); calib: a split name (default calib), a
    .txt/.jsonl path or "ebss"; tensor_types: llama-quantize style REGEX=TYPE overrides; imatrix: a llama-imatrix
    GGUF file; rotate: fold the norms and rotate the residual stream by a seeded orthogonal Q
    (transforms/rotate.py), exact in float, with any type and method; None: the method's default; rotate_seed:
    its seed (default 0); target_size ('6GiB', '3.5GB', bytes) / target_bpw: instead of --type, choose every
    tensor's type to fit the file (or llama.cpp's bits per weight) in that budget with the least predicted loss
    (plan/alloc.py); smooth='aggregate' / 'down' / 'aggregate,down': EAQuant's smoothing (transforms/smoothing.py),
    exact in float, stock llama.cpp; smooth='per-expert' / expert_hadamard: per-expert input smoothing / the expert
    Hadamard (transforms/patched.py), exact in float; the file then needs the patched llama.cpp
    (`moeq2gguf runtime build`).

    Every statistic of the float model (smoothing scales, the allocator's sensitivity) comes from one float pass
    over the calibration text (passes/calibration.py), then the quantization pass streams the file
    (passes/quantize.py); the text is read and tokenized once. profile: record seconds and memory per stage and
    layer (moeq2gguf/profile.py) in the result."""
    if config is None:
        config = ConvertConfig(**options)
    elif options:
        raise TypeError(f"convert() takes a ConvertConfig or keywords, not both ({', '.join(options)})")
    if profile:
        with profiling.collect() as prof:
            result = _convert(model_dir, output, config, progress)
        return dataclasses.replace(result, profile=prof)
    return _convert(model_dir, output, config, progress)


def _convert(model_dir, output, config: ConvertConfig, progress: bool) -> ConvertResult:
    t0 = time.time()
    cfg = config.quant
    output = Path(output)
    if not output.parent.is_dir():
        raise Moeq2ggufError(f"output folder {output.parent} does not exist; create it or choose another -o path")
    if output.is_dir():
        raise Moeq2ggufError(f"-o {output} is a directory; give a file name such as {output / 'model.gguf'}")

    world = parallel.world(config.device)   # under torchrun: this rank's share (parallel.py)
    if world.distributed:
        parallel.refuse_unsupported(config)
    if world.rank == 0:
        remove_stale_temps(output)
    model_name = model_display_name(model_dir)
    model_dir = resolve_model(model_dir)   # a local folder, or a Hub id found in / fetched into the HF cache
    adapter = open_model(model_dir)
    spec = adapter.spec
    sources = adapter.all_tensors()
    adapter.check_all_used(sources)
    rotate = config.rotate
    if rotate is None:
        rotate = default_rotate(config, sources)
        if config.rotate_seed is not None and not rotate:
            raise Moeq2ggufError(f"--rotate-seed has no effect without --rotate (--method {config.method} does not rotate "
                                 f"by default here); add --rotate or drop the seed")
    rotation = None
    if rotate:
        rotation = random_rotation(spec.hidden_size, config.seed)
        sources = rotate_sources(sources, spec, rotation)
    # files for the patched llama.cpp (runtime_patches/), after the rotation: smoothing is measured on the rotated model
    patched_model = None
    pass_sources = sources   # what the float pass runs
    if config.patched_runtime:
        from moeq2gguf.transforms import patched
        patched_model = patched.prepare(sources, spec,
                                        patched.ExpertTransforms(smooth=next(iter(config.patched_smooth), None),
                                                                 hadamard=config.expert_hadamard),
                                        transform_blocks=config.targeted)
        sources, pass_sources, spec = patched_model.sources, patched_model.pass_sources, patched_model.spec
    vocab = load_vocab(adapter.reader.model_dir, spec.vocab_size, adapter.config, adapter.default_pre_tokenizer)
    method = config.method_impl
    if world.distributed and world.size > max(spec.n_experts, 1):
        raise Moeq2ggufError(f"torchrun started {world.size} processes for a model with {spec.n_experts} routed experts; "
                             f"each rank needs at least one expert: use --nproc-per-node {max(spec.n_experts, 1)} or fewer")
    budget = alloc.make_budget(sources, config.target_size, config.target_bpw, spec) if config.targeted else None
    type_name = alloc.nearest_mix(sources, spec, budget) if budget else config.type_name  # llama.cpp only displays it

    # The calibration text, tokenized once, for whatever needs activations: the float pass's plug-ins and a
    # calibrated method's quantization pass.
    windows = None
    if config.stock_smooth or config.patched_smooth or budget is not None or (method.calibrated and not config.imatrix):
        from moeq2gguf.calib.sources import calibration_windows
        with profiling.stage("tokenize"):
            windows = calibration_windows(adapter.reader.model_dir, cfg.calib, cfg.n_windows, cfg.ctx)
    plugins = []
    smoother = sensitivity = None
    if config.stock_smooth:   # after the rotation, whose norm folding would cancel aggregate's 1/s (smoothing.py)
        smoother = smoothing.Smoothing(spec, config.stock_smooth, transform_blocks=budget is not None)
        plugins.append(smoother)
    if patched_model is not None and patched_model.maxima is not None:
        plugins.append(patched_model.maxima)

    report = QuantReport()
    writer = gguf.GGUFWriter(None, adapter.arch_name, split_max_tensors=config.split_max_tensors,
                             split_max_size=config.split_max_bytes)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    temps = [tmp]
    try:
        _add_metadata(writer, model_name, type_name, config, budget, rotation, adapter)
        if patched_model is not None:
            patched_model.add_metadata(writer)
        vocab.add_to(writer)
        if budget is not None:   # every other key is in the writer now: the file's size is exact for any types
            alloc.check_budget(writer, sources, config.overrides, budget, config.method)   # fail fast, before measuring
            # smoothing replaces the values of tensors a checkpoint holds as GGML blocks: measure those too
            measured = alloc.measured_candidates(sources, budget, config.method, include_raw=bool(config.stock_smooth))
            transforms = {"rotate": None if rotation is None else [rotation.kind, rotation.seed],
                          "smooth": list(config.stock_smooth), "expert_smooth": list(config.patched_smooth),
                          "expert_hadamard": spec.expert_hadamard_block}
            cache = sens.cache_key(adapter.reader.model_dir, cfg, measured, transforms)
            losses = sens.load_cached(cache) if measured else {}
            if losses is None:
                sensitivity = sens.Sensitivity(spec, measured, method, cfg.gptq, device=cfg.device, batch=cfg.batch_windows,
                                               tied=not any(s.name == "output.weight" for s in sources))
                plugins.append(sensitivity)
        if plugins:
            _float_pass(pass_sources, spec, windows, plugins, config, progress)
        if sensitivity is not None:
            losses = sensitivity.losses
            sens.store(cache, losses)
        if smoother is not None:
            sources = smoother.apply(sources)
        if patched_model is not None:
            patched_model.check()
        types = plan.assign(sources, config.type_name, spec, method.calibrated or config.imatrix is not None,
                            config.overrides)
        allocation = None
        if budget is not None:
            allocation = alloc.allocate(writer, sources, config.overrides, budget, config.method, losses)
            types = allocation.types
        n_bytes = _add_tensor_infos(writer, sources, types)
        if world.rank != 0:   # the pass runs on every rank (its collectives need them all); rank 0 writes the file
            if method.calibrated and not config.imatrix:
                for _ in quantized_stream(Layers.of(sources, spec.n_layers), spec, types, cfg, report, windows,
                                          progress=False, world=world):
                    pass
            log.info("rank %d of %d: peak expert statistics %.2f MiB, peak RSS %.0f MiB", world.rank, world.size,
                     report.expert_stats_peak_bytes / 2**20, _peak_rss_mib())
            return ConvertResult(output, len(sources), n_bytes, time.time() - t0, _peak_rss_mib(), report, allocation)
        # split output as llama.cpp writes it (gguf-py's writer): OUT-00001-of-0000N.gguf, the split.* keys
        temps, finals = writer.format_shard_names(tmp), writer.format_shard_names(output)
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            n_written = 0
            for data in quantized_stream(Layers.of(sources, spec.n_layers), spec, types, cfg, report, windows, progress,
                                         world):
                with profiling.stage("write"):
                    writer.write_tensor_data(data)
                n_written += 1
            assert n_written == len(sources)
            writer.close()
        except OSError as exc:
            raise Moeq2ggufError(_write_failure(temps, output, n_bytes, exc)) from exc
        if allocation is not None:
            alloc.check_written(tmp, allocation, n_bytes)
        for part, final in zip(temps, finals):
            os.replace(part, final)
        output = finals[0]
    except BaseException:
        writer.close()
        for part in temps:
            part.unlink(missing_ok=True)
        raise
    finally:
        adapter.reader.close()
    if report.coverage:
        _write_json(Path(f"{output}.coverage.json"), report.coverage)
    result = ConvertResult(output, len(sources), n_bytes, time.time() - t0, _peak_rss_mib(), report, allocation)
    log.info("rank 0 of %d: peak expert statistics %.2f MiB", world.size, report.expert_stats_peak_bytes / 2**20)
    log.info("wrote %s: %d tensors, %.1f MiB in %.1f s, peak RSS %.0f MiB", output, result.n_tensors,
             n_bytes / 2**20, result.seconds, result.peak_rss_mib)
    return result


def _write_failure(temps: list[Path], output: Path, n_bytes: int, exc: OSError) -> str:
    """The message for a write that failed: how far it got, and the room left where the output goes."""
    import shutil
    written = sum(t.stat().st_size for t in temps if t.exists())
    try:
        free = f"{shutil.disk_usage(output.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return (f"writing {output} failed after {written / 2**20:,.1f} of about {n_bytes / 2**20:,.1f} MiB ({exc}; {free}): "
            "the disk or a quota is probably full; nothing was written, free the space and run again")


def _float_pass(sources, spec, windows, plugins, config: ConvertConfig, progress: bool) -> None:
    what = [w for w, on in (("--smooth " + (config.smooth or ""), config.smooth),
                            ("a size target", config.targeted)) if on]
    bar = tqdm(total=spec.n_layers, desc="calibration pass", unit="layer", disable=not progress)
    with profiling.stage("float pass"):
        float_pass(Layers.of(sources, spec.n_layers), spec, windows, plugins, " and ".join(what), config.device,
                   config.quant.batch_windows, progress=lambda bid: bar.update())
    bar.close()


def _add_metadata(writer, model_name: str, type_name: str, config: ConvertConfig, budget, rotation, adapter) -> None:
    writer.add_name(model_name)
    writer.add_file_type(plan.file_type(type_name))
    if not plan.is_float(type_name):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("moeq2gguf.method", "imatrix-file" if config.imatrix else config.method)
        writer.add_string("moeq2gguf.type", type_name if budget is None else f"target {budget.label}")
    if rotation is not None:
        writer.add_string("moeq2gguf.rotation", rotation.kind)
        writer.add_uint64("moeq2gguf.rotation_seed", rotation.seed)
    if config.stock_smooth:
        smoothing.add_metadata(writer, config.stock_smooth)
    adapter.add_arch_metadata(writer)


def _add_tensor_infos(writer, sources, types) -> int:
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
    return n_bytes
