#!/usr/bin/env python
"""sha256 of the files `moeq2gguf convert` writes over a grid of models, mixes and recipes: record them, then
check that a refactor left every output byte unchanged.

    .venv/bin/python tools/output_hashes.py record            # writes tools/output_hashes.json
    .venv/bin/python tools/output_hashes.py check             # converts again, compares, exit 1 on a difference
    .venv/bin/python tools/output_hashes.py check --only qwen2moe-tiny:Q2_K:gptq+smooth

Conversions run through the CLI's argument parsing (so the grid survives API changes), in this process, with
--threads fixed (float reductions depend on the thread count) and a fresh sensitivity cache for each one (a
cached measurement would hide a change in the sensitivity pass). 8 calibration windows of 512 tokens keep
the grid to about 20 minutes on 2 cores; the code paths are those of the defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "moeq2gguf" / "fixtures"
DEFAULT_FILE = Path(__file__).with_suffix(".json")
MODELS = ("qwen2moe-tiny", "mixtral-tiny")
MIXES = {"Q4_K_M": "4.9", "Q2_K": "3.3"}   # mix -> the --target-bpw of the size-target recipes there
# recipe -> convert options; {bpw} is the mix's size target
RECIPES = {
    "rtn": ["--method", "rtn"],
    "imatrix": ["--method", "imatrix"],
    "gptq": ["--method", "gptq"],
    "gptq+rotate": ["--method", "gptq", "--rotate"],
    "gptq+smooth": ["--method", "gptq", "--smooth", "aggregate,down"],
    "moequant": ["--method", "moequant"],                       # rotated by default
    "moequant-norotate": ["--method", "moequant", "--no-rotate"],
    "moequant+smooth": ["--method", "moequant", "--smooth", "aggregate"],
    "moequant+perexpert": ["--method", "moequant", "--smooth", "per-expert"],
    "moequant+ehadamard": ["--method", "moequant", "--expert-hadamard"],
    "gptq+target": ["--method", "gptq", "--target-bpw", "{bpw}"],
    "moequant+smooth+target": ["--method", "moequant", "--smooth", "aggregate", "--target-bpw", "{bpw}"],
}
THREADS = 2
WINDOWS = ["--calib-windows", "8", "--calib-ctx", "512"]


def cases(only: list[str] | None) -> list[tuple[str, str, str]]:
    grid = [(m, x, r) for m in MODELS for x in MIXES for r in RECIPES]
    if only:
        grid = [c for c in grid if ":".join(c) in only]
        if not grid:
            raise SystemExit(f"--only {only}: no such case; cases are MODEL:MIX:RECIPE, e.g. qwen2moe-tiny:Q2_K:gptq")
    return grid


def convert_argv(model: str, mix: str, recipe: str, out: Path) -> list[str]:
    opts = [o.format(bpw=MIXES[mix]) for o in RECIPES[recipe]]
    typed = [] if any(o.startswith("--target") for o in opts) else ["--type", mix]
    return ["convert", str(FIXTURES / model), "-o", str(out), *typed, *opts, *WINDOWS, "--threads", str(THREADS), "-q"]


def run_case(model: str, mix: str, recipe: str, workdir: Path) -> tuple[str, float]:
    """sha256 of the file, and seconds; in a child process (a fresh cache folder and nothing left from the last)."""
    out = workdir / f"{model}-{mix}-{recipe}.gguf"
    env = dict(os.environ, MOEQ2GGUF_CACHE=str(workdir / f"cache-{model}-{mix}-{recipe}"))
    code = "import sys; from moeq2gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *convert_argv(model, mix, recipe, out)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{model} {mix} {recipe}: convert failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["record", "check"])
    ap.add_argument("--file", default=str(DEFAULT_FILE))
    ap.add_argument("--only", action="append", metavar="MODEL:MIX:RECIPE")
    args = ap.parse_args()
    path = Path(args.file)
    recorded = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    differ = 0
    with tempfile.TemporaryDirectory(prefix="output-hashes-") as tmp:
        for model, mix, recipe in cases(args.only):
            name = f"{model}:{mix}:{recipe}"
            digest, seconds = run_case(model, mix, recipe, Path(tmp))
            if args.action == "record":
                recorded["cases"][name] = digest
                print(f"{name:45} {digest[:16]} {seconds:6.1f} s", flush=True)
            else:
                want = recorded["cases"].get(name)
                same = digest == want
                differ += not same
                print(f"{name:45} {digest[:16]} {'same' if same else 'DIFFERS from ' + str(want)[:16]} {seconds:6.1f} s",
                      flush=True)
    if args.action == "record":
        recorded.update(commit=commit, threads=THREADS, windows=WINDOWS, date=time.strftime("%Y-%m-%d"))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        print(f"recorded {len(recorded['cases'])} hashes at {commit} in {path}")
        return 0
    print(f"{differ} of {len(cases(args.only))} outputs differ from those recorded at {recorded.get('commit')}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
