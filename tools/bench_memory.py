#!/usr/bin/env python
"""Peak resident memory of a conversion against the model's depth.

Generates a deep random Mixtral checkpoint (default 24 layers, float32 on disk, larger than the
bound), converts it with `python -m moeq2gguf.cli convert` in a subprocess measured by
/usr/bin/time -v (maximum resident set size; resource.getrusage(RUSAGE_CHILDREN) if /usr/bin/time
is missing), and prints the peak against one layer's float32 size and the bound
"2 layers + 1.5 GB". The converter holds one GGUF tensor at a time (a stacked expert tensor is one
layer's experts of one kind), so the peak should grow with a layer's size, not with depth.

  .venv/bin/python tools/bench_memory.py                       # 24 layers, ~3.4 GB float32
  .venv/bin/python tools/bench_memory.py --layers 12 --also-layers 3 --hidden 256 --expert-width 1024 --json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))   # testing.py: random checkpoints

BOUND_SLACK = 1.5e9  # bytes


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, str]:
    """Peak RSS in bytes of a command, and how it was measured."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if time_bin:
        proc = subprocess.run([time_bin, "-v", *cmd], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if match:
            return int(match.group(1)) * 1024, "/usr/bin/time -v"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("getrusage(RUSAGE_CHILDREN) cannot attribute a peak to this child (an earlier child peaked higher)")
    return after * 1024, "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"


def _measure(workdir: Path, layers: int, hidden: int, experts: int, expert_width: int, out_type: str, dtype: str,
             tokenizer, env: dict) -> dict:
    import torch

    from testing import write_random_mixtral

    ckpt = workdir / f"ckpt-{layers}"
    t0 = time.time()
    sizes = write_random_mixtral(ckpt, layers, hidden_size=hidden, n_experts=experts, expert_width=expert_width,
                                 n_heads=max(1, hidden // 64), n_kv_heads=max(1, hidden // 256),
                                 dtype=getattr(torch, dtype))
    tokenizer.save_pretrained(ckpt)
    generated = time.time() - t0
    out = workdir / f"out-{layers}.gguf"
    t0 = time.time()
    peak, method = peak_rss([sys.executable, "-m", "moeq2gguf.cli", "convert", str(ckpt), "-o", str(out),
                             "--type", out_type, "-q"], env)
    seconds = time.time() - t0
    bound = 2 * sizes["layer_f32"] + BOUND_SLACK
    result = {"layers": layers, "layer_f32_bytes": sizes["layer_f32"], "model_f32_bytes": sizes["model_f32"],
              "on_disk_bytes": sizes["on_disk"], "gguf_bytes": out.stat().st_size, "peak_rss_bytes": peak,
              "bound_bytes": bound, "within_bound": peak <= bound, "model_larger_than_bound": sizes["model_f32"] > bound,
              "measured_with": method, "generate_seconds": round(generated, 1), "convert_seconds": round(seconds, 1)}
    shutil.rmtree(ckpt)
    out.unlink()
    return result


def run(workdir: Path, layers: int, hidden: int, experts: int, expert_width: int, out_type: str, dtype: str,
        also_layers: int | None = None) -> dict:
    from testing import train_bpe_tokenizer

    # the tokenizer does not matter here: a small one trained on this file
    tokenizer = train_bpe_tokenizer([Path(__file__).read_text()], 512, "mixtral")
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    baseline, _ = peak_rss([sys.executable, "-c", "import moeq2gguf.commands.convert, moeq2gguf.models.mixtral"], env)
    result = {"hidden": hidden, "experts": experts, "expert_width": expert_width, "type": out_type,
              "checkpoint_dtype": dtype, "import_baseline_rss_bytes": baseline}
    result.update(_measure(workdir, layers, hidden, experts, expert_width, out_type, dtype, tokenizer, env))
    if also_layers:
        result["other_depth"] = _measure(workdir, also_layers, hidden, experts, expert_width, out_type, dtype,
                                         tokenizer, env)
    return result


def report(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    return "\n".join([
        f"model: {r['layers']} layers, hidden {r['hidden']}, {r['experts']} experts x {r['expert_width']}, "
        f"checkpoint {r['checkpoint_dtype']} ({mib(r['on_disk_bytes'])} on disk), converted to {r['type']} "
        f"({mib(r['gguf_bytes'])}) in {r['convert_seconds']} s",
        f"one layer, float32:        {mib(r['layer_f32_bytes'])}",
        f"whole model, float32:      {mib(r['model_f32_bytes'])}"
        + ("  (larger than the bound)" if r["model_larger_than_bound"] else "  (NOT larger than the bound)"),
        f"bound 2 layers + 1.5 GB:   {mib(r['bound_bytes'])}",
        f"peak RSS of the conversion: {mib(r['peak_rss_bytes'])}  ({r['measured_with']}; "
        f"python + imports alone: {mib(r['import_baseline_rss_bytes'])})",
        f"peak RSS - imports = {r['peak_rss_bytes'] / r['layer_f32_bytes'] - r['import_baseline_rss_bytes'] / r['layer_f32_bytes']:.2f} layers",
        f"within bound: {'yes' if r['within_bound'] else 'NO'}",
    ] + ([f"at {r['other_depth']['layers']} layers: peak RSS {mib(r['other_depth']['peak_rss_bytes'])} "
          f"({(r['peak_rss_bytes'] - r['other_depth']['peak_rss_bytes']) / r['layer_f32_bytes']:+.2f} layers "
          f"going to {r['layers']} layers)"] if "other_depth" in r else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=1280)
    parser.add_argument("--type", default="F16", help="output type (F32, F16, BF16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="checkpoint dtype on disk")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint and GGUF (default: a temporary folder, removed)")
    parser.add_argument("--also-layers", type=int, default=None,
                        help="also convert the same model at this depth, to show the peak does not follow depth")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a report")
    args = parser.parse_args(argv)
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_memory_")
        workdir = Path(tmp.name)
    try:
        result = run(workdir, args.layers, args.hidden, args.experts, args.expert_width, args.type, args.dtype,
                     args.also_layers)
    finally:
        if tmp:
            tmp.cleanup()
    print(json.dumps(result, indent=2) if args.json else report(result))
    ok = result["within_bound"] and result.get("other_depth", {}).get("within_bound", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
