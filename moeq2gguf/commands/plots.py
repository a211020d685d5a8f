"""Pictures for people who look rather than read: the bit allocation of a GGUF (`inspect --plot`) and the quality of
a quant (`eval --plot`). matplotlib is an optional extra (`pip install moeq2gguf[plot]`); it is imported here only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from moeq2gguf.errors import Moeq2ggufError

# tensor kinds in the order a decoder block reads them; others follow alphabetically
KIND_ORDER = ["attn_q", "attn_q_a", "attn_q_b", "attn_k", "attn_v", "attn_qkv", "attn_gate", "attn_kv_a_mqa",
              "attn_k_b", "attn_v_b", "ssm_alpha", "ssm_beta", "ssm_out", "attn_output", "ffn_gate", "ffn_up",
              "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp",
              "ffn_down_shexp"]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Moeq2ggufError("--plot needs matplotlib: pip install 'moeq2gguf[plot]' (or pip install matplotlib)") from None
    return plt


def check_path(path: str | os.PathLike[str]) -> Path:
    """The --plot file name, refused before any work if it cannot be written as a picture."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise Moeq2ggufError(f"--plot {path}: give a .png, .svg or .pdf file name")
    if not path.parent.is_dir():
        raise Moeq2ggufError(f"--plot {path}: folder {path.parent} does not exist")
    return path


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = check_path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def recipe_plot(result, path: str | os.PathLike[str]) -> Path:
    """Bits per weight of every quantized tensor: layers (rows) x tensor kinds (columns), each cell labelled with
    its GGML type; the embedding and output heads in a strip below. result: commands.inspect.InspectResult."""
    plt = _pyplot()
    cells: dict[tuple[int, str], tuple[float, str]] = {}
    heads: list[tuple[str, float, str]] = []
    from moeq2gguf.plan.mixes import allows_quantization
    for t in result.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)\.weight", t.name)
        if m and allows_quantization(t.name, len(t.shape)):   # routers, norms, convolutions stay F32 everywhere
            cells[int(m.group(1)), m.group(2)] = (t.bits_per_weight, t.type)
        elif t.name in ("token_embd.weight", "output.weight"):
            heads.append((t.name.removesuffix(".weight"), t.bits_per_weight, t.type))
    if not cells:
        raise Moeq2ggufError(f"{result.path} has no per-layer weight matrices to plot")
    present = {kind for _, kind in cells}
    kinds = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    layers = sorted({bid for bid, _ in cells})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (bid, kind), (bpw, _) in cells.items():
        grid[layers.index(bid), kinds.index(kind)] = bpw
    values = [b for b, _ in cells.values()] + [b for _, b, _ in heads]
    vmin, vmax = min(values), max(values)
    if vmax - vmin < 0.5:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    rows = min(len(layers), 48)
    height = 1.9 + 0.3 * rows + (0.9 if heads else 0)
    fig = plt.figure(figsize=(max(7.0, 1.2 + 0.95 * len(kinds)), height))
    grid_spec = fig.add_gridspec(2 if heads else 1, 1, height_ratios=[rows * 0.3, 0.35] if heads else [1],
                                 hspace=2.2 / height + 0.3)
    ax = fig.add_subplot(grid_spec[0])
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")   # grey: a layer without that tensor
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    small = len(layers) <= 48
    for (bid, kind), (bpw, qtype) in cells.items():
        if small:
            shade = (bpw - vmin) / (vmax - vmin)
            ax.text(kinds.index(kind), layers.index(bid), qtype, ha="center", va="center", fontsize=7,
                    color="black" if shade > 0.55 else "white")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    step = max(1, len(layers) // 24)
    ax.set_yticks(range(0, len(layers), step), [str(b) for b in layers[::step]], fontsize=8)
    ax.set_ylabel("layer")
    title = f"{result.path.name}: {result.bits_per_weight:.2f} bits per weight, {result.n_bytes / 2**20:.1f} MiB"
    if result.file_type:
        title += f", llama.cpp file type {result.file_type.removeprefix('MOSTLY_')}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="bits per weight", fraction=0.04, pad=0.02)
    if heads:
        hx = fig.add_subplot(grid_spec[1])
        hx.imshow([[b for _, b, _ in heads]], aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        for i, (_, bpw, qtype) in enumerate(heads):
            shade = (bpw - vmin) / (vmax - vmin)
            hx.text(i, 0, f"{qtype} ({bpw:.2f})", ha="center", va="center", fontsize=8,
                    color="black" if shade > 0.55 else "white")
        hx.set_xticks(range(len(heads)), [h for h, _, _ in heads], fontsize=8)
        hx.set_yticks([])
    out = _save(fig, path)
    plt.close(fig)
    return out


def eval_plot(result, path: str | os.PathLike[str], routing: list[float] | None = None) -> Path:
    """The per-token KLD distribution of a quant against its base (log scale, mean and percentiles marked) and, when
    given, the per-layer routing agreement. result: eval.perplexity.EvalResult (its kld_hist_counts)."""
    from moeq2gguf.eval.metrics import LogHistogram
    plt = _pyplot()
    hist = LogHistogram()
    if len(result.kld_hist_counts) != len(hist.counts):
        raise Moeq2ggufError("this evaluation kept no KLD histogram to plot")
    hist.counts = np.asarray(result.kld_hist_counts, dtype=np.int64)
    panels = 2 if routing else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    # coarsen the accumulator's log bins to about 60 for display; what lies below 1e-6 is drawn at the edge
    edges, counts = hist.edges, hist.counts[1:-1].astype(np.float64)
    counts[0] += hist.counts[0]
    keep = slice(int(np.searchsorted(edges, 1e-6)), int(np.searchsorted(edges, 1e2)))
    e, c = edges[keep.start:keep.stop + 1], counts[keep]
    group = max(1, len(c) // 60)
    n = len(c) // group * group
    c = c[:n].reshape(-1, group).sum(1)
    e = e[:n + 1:group]
    share = 100 * c / max(hist.counts.sum(), 1)
    ax.bar(e[:-1], share, width=np.diff(e), align="edge", color="#3b75af", edgecolor="none")
    ax.set_xscale("log")
    used = np.nonzero(c)[0]
    if len(used):   # the decades that hold tokens, and one either side
        ax.set_xlim(max(e[used[0]] / 10, 1e-6), min(e[used[-1] + 1] * 10, 1e2))
    for value, label, style in ((result.kld_mean, "mean", "-"), (result.kld_p99, "p99", "--"),
                                (result.kld_p99_9, "p99.9", ":")):
        if value > 0:
            ax.axvline(value, color="#c0392b", linestyle=style, linewidth=1.2, label=f"{label} {value:.3g}")
    ax.set_xlabel("KL divergence per token (base || quant)")
    ax.set_ylabel("% of scored tokens")
    ax.set_title(f"{Path(result.quant).name}: {result.tokens_scored} tokens, same top-1 {result.same_top1_pct:.1f}%, "
                 f"PPL ratio {result.ppl_ratio:.4f}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    if routing:
        rx = axes[0][1]
        rx.bar(range(len(routing)), routing, color="#27ae60")
        rx.set_ylim(min(90.0, min(routing) - 2), 100.5)
        rx.set_xlabel("MoE layer")
        rx.set_ylabel("same top-k expert set (%)")
        rx.set_title("routing agreement with the float model", fontsize=9)
        step = max(1, len(routing) // 16)
        rx.set_xticks(range(0, len(routing), step))
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
