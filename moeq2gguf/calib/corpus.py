"""Text corpora: the Python standard library split (docs/EVALUATION.md) and a user's own files.

The split is by file: sha1 of the path relative to the stdlib directory (POSIX form), as an
integer, mod 10: 0 -> eval, 1 -> calib, 2..9 -> train. site-packages is excluded. Files are
visited in sorted order so every consumer sees the same text in the same order.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError

SPLITS = ("eval", "calib", "train")


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
    """A split name (eval/calib/train) or a path to the user's text."""
    if source in SPLITS:
        return iter_split(source)
    return iter_user_texts(source)


def read_text(source: str, separator: str = "\n\n") -> str:
    return separator.join(iter_texts(source))
