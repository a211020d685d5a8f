"""Text corpora: the Python standard library split (docs/EVALUATION.md), the Python documentation's prose, and a
user's own files.

stdlib (source code; the names "eval", "calib", "train"): the split is by file: sha1 of the path relative to the
stdlib directory (POSIX form), as an integer, mod 10: 0 -> eval, 1 -> calib, 2..9 -> train. site-packages is excluded.
Files are visited in sorted order so every consumer sees the same text in the same order.

pydoc (English prose; "pydoc-eval", "pydoc-calib", "pydoc-train"): the Python language reference's topics that every
Python ships for help() (pydoc_data.topics, about 0.45 MB in 3.11), cut into pieces of about 2,000 characters at
paragraph ends and split by the same rule over "topic/piece number", so each split holds about its share of the text.
It is a second domain for the benchmarks (a model trained on it, calibrated with code or with it) and prose
calibration for a user whose model is not a code model.

"mixed-calib": the stdlib and pydoc calibration texts interleaved, about half the characters each from the start.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError

SPLITS = ("eval", "calib", "train")
PYDOC_SPLITS = tuple(f"pydoc-{s}" for s in SPLITS)
MIXED = "mixed-calib"
NAMED = SPLITS + PYDOC_SPLITS + (MIXED,)   # the sources a name (not a path) selects
PIECE_CHARS = 2000


class TextSourceError(Moeq2ggufError, ValueError):
    """A user's text file or folder that cannot be read as calibration or evaluation text."""


def stdlib_root() -> Path:
    return Path(os.__file__).resolve().parent


def split_of(relative_path: str) -> str:
    bucket = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest(), 16) % 10
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


def stdlib_files(split: str) -> list[Path]:
    if split not in SPLITS:
        raise TextSourceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = stdlib_root()
    chosen = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel.split("/"):
            continue
        if split_of(rel) == split:
            chosen.append((rel, path))
    return [path for _, path in sorted(chosen)]


def iter_split(split: str) -> Iterator[str]:
    """Yield the texts of one stdlib split, one per file, in a fixed order."""
    for path in stdlib_files(split):
        yield path.read_text(encoding="utf-8", errors="replace")


def pydoc_pieces() -> list[tuple[str, str]]:
    """(topic/piece id, text) of the Python documentation's topics in sorted topic order, each topic cut at paragraph
    ends into pieces of at least PIECE_CHARS characters (its last piece may be shorter)."""
    from pydoc_data.topics import topics
    pieces = []
    for name in sorted(topics):
        current: list[str] = []
        size = 0
        for para in topics[name].split("\n\n"):
            current.append(para)
            size += len(para) + 2
            if size >= PIECE_CHARS:
                pieces.append((f"{name}/{len(pieces)}", "\n\n".join(current)))
                current, size = [], 0
        if current:
            pieces.append((f"{name}/{len(pieces)}", "\n\n".join(current)))
    return pieces


def iter_pydoc(split: str) -> Iterator[str]:
    """Yield the pieces of one pydoc split ("pydoc-eval", "pydoc-calib", "pydoc-train") in a fixed order."""
    if split not in PYDOC_SPLITS:
        raise TextSourceError(f"unknown split {split!r}; choose one of {', '.join(PYDOC_SPLITS)}")
    part = split[len("pydoc-"):]
    for key, text in pydoc_pieces():
        if split_of(key) == part:
            yield text


def iter_mixed() -> Iterator[str]:
    """The stdlib calib split and the pydoc calib split, about half the characters each from the start: the next
    text comes from whichever domain has given fewer characters so far (until one runs out)."""
    sources = [iter_split("calib"), iter_pydoc("pydoc-calib")]
    given = [0, 0]
    while sources:
        i = min(range(len(sources)), key=given.__getitem__)
        text = next(sources[i], None)
        if text is None:
            sources.pop(i)
            given.pop(i)
            continue
        given[i] += len(text)
        yield text


def jsonl_records(path: Path, expect: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line of a .jsonl file; a line that is not JSON is an error saying
    each line must be `expect`."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be {expect}") from exc


def iter_user_texts(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield texts from a .txt file (the whole file), a .jsonl file (each line's "text" field)
    or a directory of such files (sorted)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text source {p} does not exist; pass a .txt, .jsonl or a directory of them")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
        if not files:
            raise TextSourceError(f"directory {p} holds no .txt or .jsonl files")
        for f in files:
            yield from iter_user_texts(f)
        return
    if p.suffix == ".jsonl":
        for lineno, record in jsonl_records(p, 'an object with a "text" field'):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TextSourceError(f"{p}:{lineno}: expected an object with a string \"text\" field")
            yield record["text"]
        return
    try:
        yield p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextSourceError(f"{p} is not UTF-8 text ({exc.reason}); pass a UTF-8 .txt or .jsonl file") from exc


def iter_texts(source: str) -> Iterator[str]:
    """A named source (NAMED: a stdlib or pydoc split, mixed-calib) or a path to the user's text."""
    if source in SPLITS:
        return iter_split(source)
    if source in PYDOC_SPLITS:
        return iter_pydoc(source)
    if source == MIXED:
        return iter_mixed()
    return iter_user_texts(source)


def read_text(source: str, separator: str = "\n\n") -> str:
    return separator.join(iter_texts(source))
