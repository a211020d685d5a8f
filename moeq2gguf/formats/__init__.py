"""GGML block formats, keyed by gguf.GGMLQuantizationType.

    from moeq2gguf.formats import get_format
    fmt = get_format(GGMLQuantizationType.Q4_K)
    blocks = fmt.quantize(rows, importance)      # == ggml_quantize_chunk, byte for byte

Importing this package registers every format in FORMATS (ordered by GGML type id).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def _drop_stale_numba_cache() -> None:
    """numba's on-disk cache (cache=True) is invalidated only by a change to the file that defines
    a kernel, not by changes to the helpers it inlines from other files (search.py, numerics.py).
    Key the whole package's cache on a hash of all its sources instead."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for src in sorted(here.glob("*.py")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / "numba-sources.sha256"
    try:
        if stamp.read_text() == digest.hexdigest():
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            stale.unlink(missing_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: numba then compiles in memory
        pass


_drop_stale_numba_cache()

from moeq2gguf.formats.base import FORMATS, BlockFormat, BlockParams, get_format  # noqa: E402
from moeq2gguf.formats import iq4, legacy, q2_k, q3_k, q4_k, q6_k, q8_0  # noqa: E402,F401  (registration)

for _qtype in sorted(FORMATS, key=int):  # registration follows import order; list by type id
    FORMATS[_qtype] = FORMATS.pop(_qtype)

__all__ = ["FORMATS", "BlockFormat", "BlockParams", "get_format"]
