"""Orchestration of a conversion: checkpoint -> adapter -> typed tensors -> GGUF.

The tensor infos of the whole file are declared first (from the checkpoint's headers, no data
read), then tensors are produced one at a time in file order and streamed to a temporary file
that is renamed when complete, so memory holds one tensor group and an interrupted run leaves
nothing behind.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from moeq2gguf import plan
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.registry import open_model
from moeq2gguf.vocab import load_vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    n_tensors: int
    n_bytes: int
    seconds: float
    peak_rss_mib: float


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


def convert(model_dir: str | os.PathLike[str], output: str | os.PathLike[str], type: str = "F16",
            method: str = "rtn", calib: str | None = None, device: str = "cpu", progress: bool = True) -> ConvertResult:
    """Convert a Hugging Face MoE checkpoint directory to a GGUF file llama.cpp runs."""
    t0 = time.time()
    type_name = plan.validate_type(type)
    if method not in ("rtn",):
        raise Moeq2ggufError(f"--method {method} is not available yet: float export takes no method")
    output = Path(output)
    if not output.parent.is_dir():
        raise Moeq2ggufError(f"output folder {output.parent} does not exist; create it or choose another -o path")
    if output.is_dir():
        raise Moeq2ggufError(f"-o {output} is a directory; give a file name such as {output / 'model.gguf'}")

    adapter = open_model(model_dir)
    spec = adapter.spec
    sources = adapter.all_tensors()
    adapter.check_all_used(sources)
    vocab = load_vocab(adapter.reader.model_dir, spec.vocab_size, adapter.config, adapter.default_pre_tokenizer)
    types = [plan.tensor_type(s, type_name) for s in sources]

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(None, adapter.arch_name)
    try:
        writer.add_name(Path(model_dir).resolve().name)
        writer.add_file_type(plan.file_type(type_name))
        adapter.add_arch_metadata(writer)
        vocab.add_to(writer)
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
        bar = tqdm(total=len(sources), desc=f"convert {type_name}", unit="tensor", disable=not progress)
        for source, qtype in zip(sources, types):
            tensor = source.load().reshape(source.shape)
            writer.write_tensor_data(plan.encode_float(tensor, qtype))
            del tensor
            bar.update()
        bar.close()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        adapter.reader.close()
    result = ConvertResult(output, len(sources), n_bytes, time.time() - t0, _peak_rss_mib())
    log.info("wrote %s: %d tensors, %.1f MiB in %.1f s, peak RSS %.0f MiB", output, result.n_tensors,
             n_bytes / 2**20, result.seconds, result.peak_rss_mib)
    return result
