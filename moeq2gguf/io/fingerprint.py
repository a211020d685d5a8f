"""What a cached result may be reused for: fingerprints of a checkpoint folder and of the package's own code.

A checkpoint's fingerprint does not read every byte (the models people quantize are hundreds of GB): per file that
can change a result (weights, config, tokenizer files), its name, size and modification time; for the small ones
(under 1 MiB: configs, tokenizers) every byte; for safetensors, the header (every tensor's name, dtype, shape and
offsets); for every large file 16 blocks of 64 KiB spread over it and its last 64 KiB. It trusts that a changed weight changes one of these: a file
rewritten by any tool gets a new mtime; an edit in place that keeps size and mtime and misses the sampled blocks would
not be seen (delete the cache folder after such surgery).
"""
from __future__ import annotations

import functools
import hashlib
import struct
from pathlib import Path

# files whose content changes a conversion's result (tokenizers: the calibration tokens)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
SMALL = 1 << 20
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def _file_digest(path: Path, h) -> None:
    st = path.stat()
    h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with path.open("rb") as fh:
        if st.st_size <= SMALL:
            h.update(fh.read())
            return
        if path.suffix == ".safetensors":
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + fh.read(min(n, st.st_size)))
        for offset in [st.st_size * i // SAMPLES for i in range(SAMPLES)] + [max(0, st.st_size - SAMPLE_BYTES)]:
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.is_file() and (p.suffix == ".safetensors" or p.name in CHECKPOINT_FILES):
            _file_digest(p, h)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the package's Python sources: a cached measurement made by other code is not reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
