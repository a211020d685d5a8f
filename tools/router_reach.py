"""Which experts can any calibration text reach? Per MoE layer and expert, over N windows of the calib
split (or --source): the best rank the router ever gives the expert (0 = first choice; selected when < top-k) and
its highest routing probability. An expert whose best rank is never below top-k is unreachable from
natural text: no calibration set, EBSS included, can give it tokens.

usage: python tools/router_reach.py [--models mixtral-tiny qwen2moe-tiny] [--windows 32] [--ctx 512] [--source calib|ebss|FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moeq2gguf.calib.balance import expert_top_k, load_model  # noqa: E402
from moeq2gguf.calib.sources import calibration_windows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-tiny", "qwen2moe-tiny"])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--source", default="calib", help="calib (split), ebss (the cached EBSS data convert uses) or a .txt/.jsonl file")
    args = ap.parse_args()
    for name in args.models:
        model_dir = REPO / "moeq2gguf" / "fixtures" / name
        model = load_model(model_dir, torch.device("cpu"))
        k = expert_top_k(model.config)
        windows = calibration_windows(model_dir, args.source, args.windows, args.ctx)
        best_rank, max_prob = None, None
        with torch.no_grad():
            for w in windows.split(4):
                logits = model(w, output_router_logits=True).router_logits  # per layer [tokens, experts]
                rank = torch.stack([lg.argsort(-1, descending=True).argsort(-1).min(0).values for lg in logits])
                prob = torch.stack([lg.softmax(-1).max(0).values for lg in logits])
                best_rank = rank if best_rank is None else torch.minimum(best_rank, rank)
                max_prob = prob if max_prob is None else torch.maximum(max_prob, prob)
        print(f"{name}: {windows.numel()} tokens of {args.source}, top-{k} of {best_rank.shape[1]} experts; "
              f"per layer, each expert's best rank / highest routing probability ('!': never selected)")
        for layer, (ranks, probs) in enumerate(zip(best_rank.tolist(), max_prob.tolist())):
            cells = "  ".join(f"e{e} {r}/{p:.3f}{'!' if r >= k else ''}" for e, (r, p) in enumerate(zip(ranks, probs)))
            print(f"  L{layer}  {cells}")


if __name__ == "__main__":
    main()
