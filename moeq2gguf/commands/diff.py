"""`moeq2gguf diff A.gguf B.gguf`: where two GGUF files of one model differ. Per tensor that differs: both types,
the share of differing bytes (same type) and the largest difference of the dequantized weights relative to A's
largest magnitude; and the metadata keys whose values differ. Split files are read whole (every part)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from moeq2gguf.errors import Moeq2ggufError

# keys that name or date a file rather than describe the model
IGNORED_KEYS = ("general.name", "split.no", "split.count", "split.tensors.count")


@dataclass(frozen=True)
class TensorDiff:
    name: str
    type_a: str
    type_b: str
    bytes_differing_pct: float | None   # None when the types (so the byte layouts) differ
    max_rel_diff: float                 # max |deq(A) - deq(B)| / max |deq(A)|


@dataclass
class DiffResult:
    a: Path
    b: Path
    n_tensors: int
    tensors: list[TensorDiff] = field(default_factory=list)
    metadata: dict[str, tuple[object, object]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.tensors and not self.metadata

    def to_json(self) -> str:
        return json.dumps({"a": str(self.a), "b": str(self.b), "n_tensors": self.n_tensors, "identical": self.identical,
                           "tensors": [asdict(t) for t in self.tensors],
                           "metadata": {k: [str(v) for v in pair] for k, pair in self.metadata.items()}}, indent=1)

    def table(self) -> str:
        lines = [f"A {self.a}", f"B {self.b}"]
        if self.tensors:
            width = max(len(t.name) for t in self.tensors)
            lines.append(f"{'tensor':<{width}}  {'type A':<7} {'type B':<7} {'bytes differing':>16} {'max |A-B| / max|A|':>19}")
            for t in self.tensors:
                share = "-" if t.bytes_differing_pct is None else f"{t.bytes_differing_pct:.3f}%"
                lines.append(f"{t.name:<{width}}  {t.type_a:<7} {t.type_b:<7} {share:>16} {t.max_rel_diff:>19.4g}")
        for key, (va, vb) in self.metadata.items():
            lines.append(f"metadata {key}: {_short(va)} -> {_short(vb)}")
        lines.append(f"{len(self.tensors)} of {self.n_tensors} tensors differ, {len(self.metadata)} metadata keys differ"
                     + (" (identical)" if self.identical else ""))
        return "\n".join(lines)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    from moeq2gguf.commands.inspect import _field_value, _other_parts
    if not path.is_file():
        raise Moeq2ggufError(f"{path} does not exist; pass two .gguf files")
    try:
        first = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise Moeq2ggufError(f"{path} is not a readable GGUF file ({exc})") from exc
    meta = {k: _field_value(f) for k, f in first.fields.items() if not k.startswith("GGUF.")}
    readers = [first, *(gguf.GGUFReader(p) for p in _other_parts(path, meta))]
    return meta, {t.name: t for r in readers for t in r.tensors}


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> DiffResult:
    a, b = Path(a), Path(b)
    meta_a, ta = _read(a)
    meta_b, tb = _read(b)
    if ta.keys() != tb.keys():
        only = sorted(ta.keys() ^ tb.keys())
        raise Moeq2ggufError(f"{a.name} and {b.name} hold different tensors ({len(only)} in one only, first: {only[0]}); "
                             "diff compares two files of the same model")
    result = DiffResult(a, b, len(ta))
    for name, x in ta.items():
        y = tb[name]
        rx, ry = np.asarray(x.data).tobytes(), np.asarray(y.data).tobytes()
        if x.tensor_type == y.tensor_type and rx == ry:
            continue
        share = None
        if x.tensor_type == y.tensor_type and len(rx) == len(ry):
            share = 100.0 * float(np.mean(np.frombuffer(rx, np.uint8) != np.frombuffer(ry, np.uint8)))
        dx = gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64).ravel()
        dy = gguf.quants.dequantize(y.data, y.tensor_type).astype(np.float64).ravel()
        rel = float(np.abs(dx - dy).max() / max(np.abs(dx).max(), 1e-30)) if dx.size == dy.size else float("inf")
        result.tensors.append(TensorDiff(name, x.tensor_type.name, y.tensor_type.name, share, rel))
    for key in sorted(meta_a.keys() | meta_b.keys()):
        if key in IGNORED_KEYS:
            continue
        va, vb = meta_a.get(key), meta_b.get(key)
        if va != vb:
            result.metadata[key] = (va, vb)
    return result
