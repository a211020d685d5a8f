#!/usr/bin/env python
"""Conversion time and memory at the shapes people quantize (issue 20): per shape, write a random-weight checkpoint
with --layers decoder layers (tools/make_shape_checkpoint.py; kept in --work for the next run), convert it with
`--method moequant --type Q4_K_M --profile` on --device, and report seconds per stage per layer, peak host RSS, peak
GPU memory, and the whole model's time extrapolated from the measured layers (fixed costs plus the mean MoE-layer
time times the real layer count; dense leading layers counted at their own measured time). Then the converted file
is loaded in llama-cpp-python and its logits checked finite. The report (JSON) is saved after every step, so a run
stopped by a time limit keeps what it measured.

    python tools/bench_scale.py --shape qwen1.5-moe-a2.7b --layers 2 --device cpu --out .cache/bench_scale/cpu.json
    python tools/bench_scale.py --shape qwen1.5-moe-a2.7b --shape qwen3-30b-a3b --device cuda   # on a GPU machine

Random weights route near uniformly, so every expert gets about its share of the calibration tokens; trained
models with rare experts spend about the same in GPTQ (its cost does not depend on the token count).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import make_shape_checkpoint as shapes  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = ""
    try:
        import torch
        if torch.cuda.is_available():
            gpu = ", " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu} ({len(os.sched_getaffinity(0))} cores){gpu}"


def save(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def extrapolate(profile: dict, total_s: float, shape: str) -> dict:
    per_layer = {int(b): sum(v.values()) for b, v in profile["per_layer_seconds"].items()}
    real = shapes.SHAPES[shape]
    dense = real.get("first_k_dense_replace", 0)
    moe = [s for b, s in per_layer.items() if b >= dense]
    dense_s = [s for b, s in per_layer.items() if b < dense]
    fixed = total_s - sum(per_layer.values())
    moe_mean = sum(moe) / len(moe) if moe else 0.0
    dense_mean = sum(dense_s) / len(dense_s) if dense_s else moe_mean
    n = real["num_hidden_layers"]
    whole = fixed + dense * dense_mean + (n - dense) * moe_mean
    return {"fixed_s": round(fixed, 1), "moe_layer_s": round(moe_mean, 1), "dense_layer_s": round(dense_mean, 1),
            "layers": n, "whole_model_s": round(whole, 1)}


def run_shape(shape: str, layers: int, device: str, work: Path, windows: int, report: dict, out: Path,
              expert_group: int | None = None) -> None:
    row = report["rows"].setdefault(shape, {"layers": layers, "device": device, "expert_group": expert_group})
    ckpt = work / f"{shape}-{layers}"
    if not (ckpt / "config.json").is_file():
        t0 = time.time()
        shapes.write(shape, ckpt, layers)
        row["write_checkpoint_s"] = round(time.time() - t0, 1)
        save(report, out)
    gguf = work / f"{shape}-{layers}-Q4_K_M.gguf"
    code = ("import json, sys; from moeq2gguf import convert; "
            "r = convert(sys.argv[1], sys.argv[2], type='Q4_K_M', method='moequant', device=sys.argv[3], "
            "calib_windows=int(sys.argv[4]), expert_group=json.loads(sys.argv[5]), progress=False, profile=True); "
            "print(json.dumps({'seconds': r.seconds, 'peak_rss_mib': r.peak_rss_mib, 'bytes': r.n_bytes, "
            "'profile': r.profile.to_dict(), 'expert_stats_peak_mib': r.report.expert_stats_peak_bytes / 2**20}))")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(gguf), device, str(windows),
                           json.dumps(expert_group)], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-3000:]
        save(report, out)
        raise SystemExit(f"{shape}: conversion failed: {row['error']}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(convert_s=round(time.time() - t0, 1), converter_s=round(result["seconds"], 1),
               peak_rss_mib=round(result["peak_rss_mib"]), file_mib=round(result["bytes"] / 2**20, 1),
               expert_stats_peak_mib=round(result["expert_stats_peak_mib"]),
               stages={k: v for k, v in result["profile"]["stages"].items()},
               per_layer_seconds=result["profile"]["per_layer_seconds"],
               per_layer_peak_mib=result["profile"].get("per_layer_peak_mib", {}),
               peak_gpu_mib=max((v["peak_gpu_mib"] for v in result["profile"]["stages"].values()), default=0),
               extrapolated=extrapolate(result["profile"], result["seconds"], shape))
    save(report, out)
    check = ("import sys, numpy as np; from moeq2gguf import runtime\n"
             "with runtime.load(sys.argv[1], n_ctx=64) as llm:\n"
             "    x = runtime.logits(llm, list(range(10, 42)))\n"
             "print(bool(np.isfinite(x).all()), float(np.abs(x).max()))")
    proc = subprocess.run([sys.executable, "-c", check, str(gguf)], capture_output=True, text=True, cwd=REPO)
    row["llama_cpp_logits_finite"] = proc.stdout.strip() or proc.stderr.strip()[-500:]
    save(report, out)
    gguf.unlink(missing_ok=True)


def llama_cpp_times(ckpt: Path, work: Path, windows: int) -> dict:
    """What a llama.cpp user runs on the same checkpoint: the float GGUF (our F16 conversion, the same bytes as
    convert_hf_to_gguf.py's), llama-imatrix on 32 x 512 tokens of the same calibration text, llama-quantize --imatrix
    Q4_K_M; seconds of each. llama-imatrix offloads to a GPU when its build has CUDA (-ngl 99 is passed either way)."""
    sys.path.insert(0, str(REPO))
    from moeq2gguf import convert
    from moeq2gguf.calib import corpus
    from moeq2gguf.runtime.llama_tools import llama_tool, run_tool
    f16, imatrix, quant = (work / f"{ckpt.name}-{s}" for s in ("F16.gguf", "imatrix.gguf", "Q4_K_M-llama.gguf"))
    calib = work / "calib.txt"
    if not calib.is_file():
        calib.write_text(corpus.read_text("calib"))
    t0 = time.time()
    convert(ckpt, f16, type="F16", progress=False)
    t1 = time.time()
    log = run_tool([llama_tool("llama-imatrix"), "-m", f16, "-f", calib, "-o", imatrix, "-c", 512, "--chunks", windows,
                    "-t", len(os.sched_getaffinity(0)), "-ngl", 99])
    t2 = time.time()
    run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix, f16, quant, "Q4_K_M", len(os.sched_getaffinity(0))])
    t3 = time.time()
    for f in (f16, imatrix, quant):
        f.unlink(missing_ok=True)
    offloaded = re.search(r"offloaded (\d+)/\d+ layers to GPU", log)
    on_gpu = offloaded is not None and int(offloaded.group(1)) > 0
    return {"f16_s": round(t1 - t0, 1), "imatrix_s": round(t2 - t1, 1), "quantize_s": round(t3 - t2, 1),
            "imatrix_on": "GPU" if on_gpu else f"CPU ({len(os.sched_getaffinity(0))} threads)"}


def run_llama(shape: str, layers: int, work: Path, windows: int, report: dict, out: Path) -> None:
    """llama.cpp imatrix + quantize at `layers` and `layers - 1` decoder layers: the difference is its time per layer,
    so its whole-model time is extrapolated as ours is (fixed costs once, per-layer times the real layer count)."""
    row = report["rows"].setdefault(shape, {})
    runs = {}
    for n in sorted({max(1, layers - 1), layers}):
        ckpt = work / f"{shape}-{n}"
        if not (ckpt / "config.json").is_file():
            shapes.write(shape, ckpt, n)
        runs[n] = llama_cpp_times(ckpt, work, windows)
        row["llama_cpp"] = {"runs": runs}
        save(report, out)
    total = {n: r["imatrix_s"] + r["quantize_s"] for n, r in runs.items()}
    real = shapes.SHAPES[shape]["num_hidden_layers"]
    if len(total) == 2:
        lo, hi = sorted(total)
        per_layer = max(0.0, (total[hi] - total[lo]) / (hi - lo))
        whole = total[hi] + (real - hi) * per_layer
    else:   # one layer only: every second of it scaled (an overestimate of llama.cpp's time)
        per_layer, whole = total[layers], total[layers] * real
    row["llama_cpp"].update(per_layer_s=round(per_layer, 1), whole_model_s=round(whole, 1))
    ours = row.get("extrapolated", {}).get("whole_model_s")
    if ours:
        row["llama_cpp"]["ours_over_llama_cpp"] = round(ours / whole, 2)
    save(report, out)


def memory_plan(memory: str, device: str) -> str:
    """How the converter would take each shape's MoE layer with `memory` free on `device` (passes/expert_groups.py's
    estimate; no checkpoint is written, nothing is measured)."""
    sys.path.insert(0, str(REPO))
    from types import SimpleNamespace
    import torch
    from moeq2gguf.passes import expert_groups
    from moeq2gguf.plan.alloc import parse_size
    free = parse_size(memory, "--plan")
    lines = [f"{memory} free on {device} (predicted by passes/expert_groups.py, moequant):"]
    for name, cfg in shapes.SHAPES.items():
        n = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
        hidden, ff = cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        stacks = [SimpleNamespace(name=p, shape=shape, role="expert")
                  for p, shape in (("gate", (n, ff, hidden)), ("up", (n, ff, hidden)), ("down", (n, hidden, ff)))]
        weights, per_expert = expert_groups.layer_bytes(stacks, True)
        g = expert_groups.plan(stacks, n, True, torch.device(device), None, available=free)
        how = "all experts at once" if g is None else (f"{g.size} experts per group" +
                                                        (", expert weights in host memory" if g.host_stacks else "") +
                                                        ("" if g.fits else "; does not fit even so"))
        lines.append(f"  {name}: {n} experts, expert weights + dequantized copies {weights / 2**30:.1f} GiB, "
                     f"{per_expert / 2**20:.0f} MiB per expert of statistics and GPTQ work -> {how}")
    return "\n".join(lines)


def table(report: dict) -> str:
    lines = [f"machine: {report['machine']}; {report['date']}, commit {report['commit']}; calibration "
             f"{report['windows']} x 512 tokens; moequant Q4_K_M"]
    for shape, r in report["rows"].items():
        if "extrapolated" not in r:
            lines.append(f"{shape}: {r.get('error', 'not measured')}")
            continue
        e, st = r["extrapolated"], r["stages"]
        top = sorted(st.items(), key=lambda kv: -kv[1]["seconds"])[:6]
        group = f", experts in groups of {r['expert_group']}" if r.get("expert_group") else ""
        stats = f", routed statistics peak {r['expert_stats_peak_mib']} MiB" if "expert_stats_peak_mib" in r else ""
        lines.append(f"{shape} on {r['device']}{group}, {r['layers']} layers measured: conversion {r['converter_s']} s, "
                     f"peak RSS {r['peak_rss_mib']} MiB{stats}, peak GPU {r['peak_gpu_mib']:.0f} MiB; per MoE layer "
                     f"{e['moe_layer_s']} s, fixed {e['fixed_s']} s -> whole model ({e['layers']} layers) about "
                     f"{e['whole_model_s'] / 60:.1f} min (extrapolated); llama-cpp-python logits finite: "
                     f"{r.get('llama_cpp_logits_finite')}")
        lines.append("  stages (s): " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in top))
        for b, v in r["per_layer_seconds"].items():
            lines.append(f"  layer {b}: " + ", ".join(f"{k} {s:.1f}" for k, s in sorted(v.items(), key=lambda kv: -kv[1])[:6]))
        if r.get("per_layer_peak_mib"):
            lines.append("  peak RSS / GPU MiB during: " + ", ".join(
                f"{'layer ' + k if k != 'outside' else 'outside the layers'} {v['rss']} / {v['gpu']}"
                for k, v in r["per_layer_peak_mib"].items()))
        lc = r.get("llama_cpp")
        if lc and "whole_model_s" in lc:
            runs = "; ".join(f"{n} layers: F16 {v['f16_s']} s, imatrix {v['imatrix_s']} s ({v['imatrix_on']}), quantize "
                             f"{v['quantize_s']} s" for n, v in lc["runs"].items())
            lines.append(f"  llama.cpp imatrix + quantize Q4_K_M, same machine: {runs} -> per layer {lc['per_layer_s']} s, "
                         f"whole model about {lc['whole_model_s'] / 60:.1f} min (extrapolated); moequant / llama.cpp "
                         f"{lc.get('ours_over_llama_cpp', 'n/a')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=list(shapes.SHAPES), help="a real model's shape (repeatable)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    ap.add_argument("--llama", action="store_true",
                    help="also time llama.cpp's route on the same checkpoint (F16, llama-imatrix, llama-quantize "
                         "--imatrix Q4_K_M) at --layers and --layers - 1 layers")
    ap.add_argument("--skip-convert", action="store_true", help="only the llama.cpp timing (with --llama)")
    ap.add_argument("--expert-group", type=int, default=None, metavar="N",
                    help="convert --expert-group N (default: the converter's choice from free memory)")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench_scale"))
    ap.add_argument("--out", default=None, help="the JSON report (default WORK/report-DEVICE.json)")
    ap.add_argument("--table", default=None, metavar="REPORT", help="only print the table of a saved report")
    ap.add_argument("--plan", default=None, metavar="MEMORY",
                    help="only print how each shape's MoE layer would be taken with MEMORY free on --device (24GiB)")
    args = ap.parse_args()
    if args.plan:
        print(memory_plan(args.plan, args.device))
        return 0
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / f"report-{args.device}.json")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "commit": commit, "windows": args.windows,
              "rows": {}}
    if args.skip_convert and out.is_file():   # add llama.cpp's times to a saved report
        report = json.loads(out.read_text())
    for shape in args.shape or ["qwen1.5-moe-a2.7b"]:
        if not args.skip_convert:
            run_shape(shape, args.layers, args.device, work, args.windows, report, out, args.expert_group)
            print(table({**report, "rows": {shape: report["rows"][shape]}}).splitlines()[1], flush=True)
        if args.llama:
            run_llama(shape, args.layers, work, args.windows, report, out)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
