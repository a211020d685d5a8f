"""Lazy reading of a Hugging Face checkpoint directory, one tensor at a time.

Tensors are opened with safetensors' safe_open and materialised only when asked for, so a
converter that walks the model layer by layer holds one layer in memory. Single files and
sharded checkpoints (model.safetensors.index.json) are both read.
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


def _check_safetensors_file(path: Path) -> None:
    """Fail early and clearly on a truncated or corrupt file: the header names every tensor's
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
        self._file_of = self._index_tensors()
        self._handles: dict[Path, object] = {}
        self._consumed: set[str] = set()

    def _index_tensors(self) -> dict[str, Path]:
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = {name: self.model_dir / fname for name, fname in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index_path.name} names {f.name}, which is missing; download all shards")
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"{self.model_dir} holds no *.safetensors files; convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True) first")
            files = {}
            for f in shards:
                _check_safetensors_file(f)
                with safe_open(f, framework="pt") as handle:
                    files.update({name: f for name in handle.keys()})
            return files
        for f in sorted(set(files.values())):
            _check_safetensors_file(f)
        return files

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._handle(self._file_of[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (a fresh copy, safe to modify)."""
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is missing from {self.model_dir}; the checkpoint is incomplete")
        self._consumed.add(name)
        return self._handle(self._file_of[name]).get_tensor(name).to(torch.float32)

    def mark_used(self, name: str) -> None:
        self._consumed.add(name)

    def unused(self) -> list[str]:
        return [n for n in self.names() if n not in self._consumed and not n.endswith(IGNORED_SUFFIXES)]

    def close(self) -> None:
        self._handles.clear()
