"""What is in a GGUF file, or what the converter will make of a checkpoint.

inspect(path) reads a .gguf (metadata and tensor infos only, no data) or a Hugging Face checkpoint
directory (config.json and safetensors headers only): architecture, layer and expert counts, and
per tensor its GGUF name, shape, GGML type and size; for a checkpoint also the checkpoint tensors
each GGUF tensor is made from and the type it gets for the requested --type. Shapes are in ggml
order (ne0 first: the dimension a matmul reduces over), as llama.cpp and gguf-dump print them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from moeq2gguf.errors import Moeq2ggufError

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]            # ggml order
    type: str                         # GGML type name (F32, F16, Q4_K, MXFP4, ...)
    n_elements: int
    n_bytes: int
    inputs: tuple[str, ...] = ()      # checkpoint tensors it is made from (checkpoint inspection)
    role: str = ""                    # embedding | output | attention | router | expert | shared | dense | norm | bias

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0


@dataclass(frozen=True)
class TypeSummary:
    type: str
    n_tensors: int
    n_elements: int
    n_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0


@dataclass(frozen=True)
class InspectResult:
    path: Path
    kind: str                         # gguf | checkpoint
    architecture: str                 # llama.cpp architecture
    n_layers: int
    n_experts: int
    n_experts_used: int
    tensors: list[TensorRow]
    hf_architecture: str | None = None
    file_type: str | None = None      # GGUF general.file_type, or the --type a checkpoint was inspected for
    metadata: dict = field(default_factory=dict)   # GGUF scalar keys (arrays as their length), or the ModelSpec

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements if self.n_elements else 0.0

    def by_type(self) -> list[TypeSummary]:
        groups: dict[str, list[TensorRow]] = {}
        for t in self.tensors:
            groups.setdefault(t.type, []).append(t)
        return [TypeSummary(name, len(rows), sum(r.n_elements for r in rows), sum(r.n_bytes for r in rows))
                for name, rows in sorted(groups.items(), key=lambda kv: -sum(r.n_bytes for r in kv[1]))]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out.update(n_elements=self.n_elements, n_bytes=self.n_bytes, bits_per_weight=self.bits_per_weight,
                   by_type=[{**dataclasses.asdict(s), "bits_per_weight": s.bits_per_weight} for s in self.by_type()])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def table(self) -> str:
        head = f"{self.path}: {self.kind}, architecture {self.architecture}"
        if self.hf_architecture:
            head += f" (from {self.hf_architecture})"
        lines = [head,
                 f"{self.n_layers} layers, {self.n_experts} experts ({self.n_experts_used} used per token)"
                 + (f", type {self.file_type}" if self.file_type else ""),
                 f"{len(self.tensors)} tensors, {self.n_elements / 1e6:.2f} M weights, {self.n_bytes / 2**20:.2f} MiB, "
                 f"{self.bits_per_weight:.2f} bits per weight", "",
                 f"{'type':<8} {'tensors':>8} {'M weights':>10} {'MiB':>10} {'bpw':>6}"]
        if "moeq2gguf.rotation" in self.metadata:
            lines.insert(3, f"residual stream rotated: {self.metadata['moeq2gguf.rotation']}, seed "
                            f"{self.metadata.get('moeq2gguf.rotation_seed')} (norms folded; float outputs unchanged)")
        if "moeq2gguf.smoothing" in self.metadata:
            m = self.metadata
            lines.insert(4 if "moeq2gguf.rotation" in m else 3,
                         f"smoothed: {m['moeq2gguf.smoothing']}, alpha {float(m.get('moeq2gguf.smoothing_alpha', 0)):.2f} "
                         "(EAQuant, folded into the weights; float outputs unchanged)")
        for s in self.by_type():
            lines.append(f"{s.type:<8} {s.n_tensors:>8} {s.n_elements / 1e6:>10.3f} {s.n_bytes / 2**20:>10.3f} "
                         f"{s.bits_per_weight:>6.2f}")
        width = max((len(t.name) for t in self.tensors), default=4)
        lines += ["", f"{'name':<{width}}  {'shape (ggml order)':<22} {'type':<7} {'MiB':>9}"
                  + ("  from" if self.kind == "checkpoint" else "")]
        for t in self.tensors:
            row = f"{t.name:<{width}}  {str(list(t.shape)):<22} {t.type:<7} {t.n_bytes / 2**20:>9.3f}"
            if t.inputs:
                row += "  " + (t.inputs[0] if len(t.inputs) == 1 else f"{t.inputs[0]} (+{len(t.inputs) - 1})")
            lines.append(row)
        return "\n".join(lines)


def _n_bytes(n_elements: int, ne0: int, qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if ne0 % block:
        raise Moeq2ggufError(f"row length {ne0} is not a multiple of {qtype.name}'s block size {block}")
    return n_elements // block * type_size


def _field_value(f: gguf.ReaderField):
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return f"[{len(f.data)} items]"
    return f.contents()


def _other_parts(path: Path, meta: dict) -> list[Path]:
    """The other files of a split GGUF (llama.cpp's OUT-00001-of-0000N.gguf naming), given its first part."""
    import re
    count = int(meta.get("split.count", 1) or 1)
    if count <= 1:
        return []
    match = re.fullmatch(r"(.*)-00001-of-(\d{5})\.gguf", path.name)
    if not match or int(match.group(2)) != count:
        raise Moeq2ggufError(f"{path} is part {int(meta.get('split.no', 0)) + 1} of a {count}-part split GGUF; pass the "
                             "first part, named ...-00001-of-...gguf")
    parts = [path.with_name(f"{match.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise Moeq2ggufError(f"{path} is the first of {count} parts, and {', '.join(missing)} is missing next to it")
    return parts


def _inspect_gguf(path: Path) -> InspectResult:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise Moeq2ggufError(f"{path} is not a readable GGUF file ({exc})") from exc
    meta = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = str(meta.get("general.architecture", "?"))
    ftype = meta.get("general.file_type")
    readers = [reader, *(gguf.GGUFReader(p) for p in _other_parts(path, meta))]
    tensors = [TensorRow(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
               for r in readers for t in r.tensors]
    return InspectResult(
        path=path, kind="gguf", architecture=arch, n_layers=int(meta.get(f"{arch}.block_count", 0)),
        n_experts=int(meta.get(f"{arch}.expert_count", 0)), n_experts_used=int(meta.get(f"{arch}.expert_used_count", 0)),
        tensors=tensors, file_type=gguf.LlamaFileType(ftype).name if isinstance(ftype, int) else None, metadata=meta)


def _inspect_checkpoint(path: Path, type_name: str) -> InspectResult:
    from moeq2gguf import plan
    from moeq2gguf.models.registry import open_model
    type_name = plan.validate_type(type_name)
    adapter = open_model(path)
    try:
        sources = adapter.all_tensors()
        adapter.check_all_used(sources)
    finally:
        adapter.reader.close()
    rows = []
    # the types convert --type TYPE (--method rtn, no overrides) would give: llama-quantize's rules for a mix; the
    # i-quant mixes run only with an importance matrix, and with one their rules differ
    from moeq2gguf.plan.mixes import IMATRIX_MIXES
    for s, qtype in zip(sources, plan.assign(sources, type_name, adapter.spec, has_imatrix=type_name in IMATRIX_MIXES)):
        n = int(np.prod(s.shape))
        rows.append(TensorRow(s.name, tuple(reversed(s.shape)), qtype.name, n, _n_bytes(n, s.shape[-1], qtype),
                              s.inputs, s.role))
    spec = adapter.spec
    return InspectResult(
        path=path, kind="checkpoint", architecture=adapter.arch_name, n_layers=spec.n_layers,
        n_experts=spec.n_experts, n_experts_used=spec.n_experts_used, tensors=rows,
        hf_architecture=spec.hf_architecture, file_type=type_name, metadata=dataclasses.asdict(spec))


def inspect(path: str | os.PathLike[str], type: str = "F16") -> InspectResult:
    """Describe a .gguf file, or what `convert(path, type=type)` would write for a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return _inspect_checkpoint(path, type)
    if path.is_file():
        return _inspect_gguf(path)
    raise Moeq2ggufError(f"{path} does not exist; pass a .gguf file or a checkpoint directory")
