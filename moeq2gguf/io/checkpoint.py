"""Lazy reading of a Hugging Face checkpoint directory, one tensor at a time.

Tensors are materialised only when asked for, so a converter that walks the model layer by layer
holds one layer in memory. Shapes and dtypes come from the files' headers. A file is opened (and
memory-mapped by safetensors) only for the duration of one read: pages of a map that stays open
count in the process's resident memory, which then grows with the whole checkpoint.
Single files and sharded checkpoints (model.safetensors.index.json) are both read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from moeq2gguf.errors import CheckpointError

# Buffers some exporters save that carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# quantization_config.quant_method values whose weights are read: none, FP8 with block scales (DeepSeek-V3 and the
# releases that copy its layout), GPT-OSS's MXFP4 experts (kept as MXFP4 by its adapter)
SUPPORTED_QUANTIZATION = (None, "fp8", "mxfp4")


def _read_header(path: Path) -> dict:
    """The file's header, after checking the file is complete: the header names every tensor's
    byte range, so the file must be at least as long as the largest end offset."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it") from exc
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_len > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_len} bytes but the file has {size}; "
            "re-download or re-save the checkpoint")
    return {k: v for k, v in header.items() if k != "__metadata__"}


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir} is not a directory; pass the folder that holds config.json and *.safetensors")
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.model_dir} has no config.json; pass a Hugging Face checkpoint directory")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        stored_as = (self.config.get("quantization_config") or {}).get("quant_method")
        if stored_as not in SUPPORTED_QUANTIZATION:
            raise CheckpointError(f"{config_path} says the weights are quantized with {stored_as!r}, which this converter "
                                  f"does not read (it reads {', '.join(m for m in SUPPORTED_QUANTIZATION if m)}); "
                                  "dequantize the checkpoint to BF16 first")
        self._file_of: dict[str, Path] = {}
        self._header: dict[str, dict] = {}
        self._index_tensors()
        self._consumed: set[str] = set()

    def _index_tensors(self) -> None:
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted({self.model_dir / fname for fname in weight_map.values()})
            for f in shards:
                if not f.is_file():
                    raise CheckpointError(f"{index_path.name} names {f.name}, which is missing; download all shards")
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"{self.model_dir} holds no *.safetensors files; convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True) first")
        for f in shards:
            for name, entry in _read_header(f).items():
                self._file_of[name] = f
                self._header[name] = entry

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._header[name]["dtype"]

    def get_raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), read from a file opened for this read only."""
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is missing from {self.model_dir}; the checkpoint is incomplete")
        self._consumed.add(name)
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (a fresh copy, safe to modify); FP8 weights dequantized with their block scales."""
        raw = self.get_raw(name)
        if raw.dtype in FP8_DTYPES:
            return self._dequantize_fp8(name, raw)
        return raw.to(torch.float32)

    def _dequantize_fp8(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's FP8 layout (also Kimi-K2's, Qwen3's and GLM's FP8 releases): the weight in e4m3 and
        `<name>_scale_inv` [ceil(rows / b0), ceil(cols / b1)] in float32, one scale per b0 x b1 block
        (quantization_config.weight_block_size, [128, 128]); the value is e4m3 * scale, computed in float32."""
        scale_name = f"{name}_scale_inv"
        if not self.has(scale_name):
            raise CheckpointError(f"{name} is stored as {raw.dtype} but the checkpoint has no {scale_name}; only FP8 "
                                  "with block scales (weight_scale_inv, as DeepSeek-V3 ships it) is supported")
        scale = self.get_raw(scale_name).to(torch.float32)
        b0, b1 = (self.config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
        if raw.dim() != 2:
            raise CheckpointError(f"{name}: FP8 weights with block scales must be matrices, got shape {tuple(raw.shape)}")
        rows, cols = raw.shape
        want = (-(-rows // b0), -(-cols // b1))
        if tuple(scale.shape) != want:
            raise CheckpointError(f"{scale_name} has shape {tuple(scale.shape)}, expected {want} for {b0} x {b1} blocks "
                                  f"of {name} {tuple(raw.shape)}; the checkpoint's weight_block_size may be wrong")
        per_element = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
        return raw.to(torch.float32) * per_element

    def mark_used(self, name: str) -> None:
        self._consumed.add(name)

    def unused(self) -> list[str]:
        return [n for n in self.names() if n not in self._consumed and not n.endswith(IGNORED_SUFFIXES)]

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release a reader explicitly."""
