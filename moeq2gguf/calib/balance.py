"""Expert balance of a calibration set (docs/METHODS.md section 5): which experts its tokens reach.

For every MoE layer, count how often each routed expert is selected (top-k of the router) over all
tokens of the set. The balance metric is

    sigma = mean over MoE layers of std_e( count[l, e] / sum_e count[l, e] )

(population std over the E experts of the normalised selection frequencies, which sum to 1 per
layer). A perfectly balanced layer has sigma 0; a layer that sends every token to the same k
experts has sigma sqrt(k/E * (1/k - 1/E)^2 + (E-k)/E * (1/E)^2), e.g. 0.217 for k=2 of E=8.
The same function scores one EBSS beam (its own tokens' counts) and a whole set.

Which experts a token selects is the family's own routing rule applied to the router logits transformers
records (ExpertSelector: nn.select_experts, the calibration forward's rule), so every supported family is
counted as llama.cpp routes it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeq2gguf import nn
from moeq2gguf.calib.windows import read_token_file, token_windows
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec

log = logging.getLogger(__name__)

class ExpertSelector:
    """The experts the runtime would select, from the router logits transformers records: the family's own routing
    rule (nn.select_experts, the one the calibration forward and llama.cpp use: softmax top-k, sigmoid scores with a
    selection bias and group-limited choice, a router bias with top-k on the logits), per MoE layer in router call
    order with that layer's selection bias. Every family the converter supports gets it; no list to extend."""

    def __init__(self, spec: ModelSpec, selection_biases: list[torch.Tensor | None]):
        self.spec = spec
        self.biases = selection_biases
        self.top_k, self.n_experts = spec.n_experts_used, spec.n_experts

    @classmethod
    def for_model(cls, model, model_dir: str | Path) -> "ExpertSelector":
        """model: transformers' model of the checkpoint at model_dir (whose adapter gives the routing rule)."""
        from moeq2gguf.models.registry import open_model
        adapter = open_model(model_dir)
        try:
            spec = adapter.spec
        finally:
            adapter.reader.close()
        target = model.model._can_record_outputs["router_logits"].target_class
        modules = dict(model.named_modules())

        def selection_bias(name: str):
            # on the router (DeepSeek-V3, GLM-4.5), in a child of it (ERNIE-4.5's moe_statics, [1, E]) or on its MoE
            # block (MiniMax-M2)
            for module in (*modules[name].modules(), modules.get(name.rpartition(".")[0])):
                bias = getattr(module, "e_score_correction_bias", None)
                if bias is not None:
                    return bias.reshape(-1)
            return None
        return cls(spec, [selection_bias(n) for n, m in modules.items() if isinstance(m, target)])

    def chosen(self, router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[torch.Tensor]:
        """(T, k) expert ids per MoE layer."""
        if len(router_logits) != len(self.biases):
            raise AssertionError(f"{len(router_logits)} router outputs for {len(self.biases)} routers")
        return [nn.select_experts(logits.float(), self.spec, bias).experts
                for logits, bias in zip(router_logits, self.biases)]

    def reach(self, router_logits) -> tuple[torch.Tensor, torch.Tensor]:
        """Per MoE layer and expert over these tokens: the best rank the family's selection score gave it (0 = first
        choice; selected when < top_k) and its highest routing probability; (n_layers, E) each."""
        ranks, probs = [], []
        for logits, bias in zip(router_logits, self.biases):
            p, select = nn.selection_scores(logits.float(), self.spec, bias)
            if self.spec.routing.scoring == "softmax_topk":
                p = torch.softmax(p, dim=-1)
            ranks.append(select.argsort(-1, descending=True).argsort(-1).min(0).values)
            probs.append(p.max(0).values)
        return torch.stack(ranks), torch.stack(probs)

    def counts(self, router_logits, n_rows: int | None = None) -> torch.Tensor:
        """(n_layers, E) selection counts over all tokens, or (n_rows, n_layers, E) per row (rows major, as
        transformers flattens [batch, seq])."""
        return selection_counts(self.chosen(router_logits), self.n_experts, n_rows)


def router_layer_ids(model) -> list[int]:
    """Decoder layer index of each router, in the order transformers returns router_logits."""
    recorder = model.model._can_record_outputs["router_logits"]
    names = [name for name, module in model.named_modules() if isinstance(module, recorder.target_class)]
    ids = []
    for name in names:
        match = re.search(r"layers\.(\d+)\.", name)
        assert match, f"router module {name} has no layer index"
        ids.append(int(match.group(1)))
    return ids


def selection_counts(chosen: list[torch.Tensor], n_experts: int, n_rows: int | None = None) -> torch.Tensor:
    """Counts of the selected expert ids: chosen, one (n_rows * seq, k) tensor per MoE layer. Returns (n_layers, E)
    int64 counts over all tokens, or (n_rows, n_layers, E) per row when n_rows is given."""
    per_layer = []
    for ids in chosen:
        onehot = torch.zeros(ids.shape[0], n_experts, dtype=torch.int64, device=ids.device)
        onehot.scatter_(1, ids, 1)                                     # (T, E), k ones per token
        if n_rows is None:
            per_layer.append(onehot.sum(0))
        else:
            per_layer.append(onehot.view(n_rows, -1, n_experts).sum(1))
    return torch.stack(per_layer, dim=-2)


def balance_sigma(counts: torch.Tensor) -> torch.Tensor:
    """sigma of (..., n_layers, E) counts -> (...): mean over layers of the std of the frequencies."""
    counts = counts.to(torch.float64)
    freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return freq.std(-1, unbiased=False).mean(-1)


def layer_sigma(counts: torch.Tensor) -> torch.Tensor:
    """(n_layers, E) counts -> (n_layers,) std of the normalised frequencies per layer."""
    counts = counts.to(torch.float64)
    freq = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return freq.std(-1, unbiased=False)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu"):
    """The checkpoint as transformers' own model, float32, eval mode."""
    import json

    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        raise Moeq2ggufError(
            f"EBSS and the balance report run the checkpoint with transformers' own model, and transformers has no "
            f"class for model_type {config.get('model_type')!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "calibrate this model from text instead (--calib FILE or the default calib split)") from exc
    return model.to(device).eval()


def resolve_device(device: str | None) -> torch.device:
    """None or "auto": the GPU when torch sees one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise Moeq2ggufError(f"--device {device}: no CUDA device is visible to torch; use --device cpu")
    return torch.device(device)


@torch.no_grad()
def expert_counts(model, windows: torch.Tensor, selector: ExpertSelector, batch: int = 8,
                  reach: dict | None = None) -> torch.Tensor:
    """(n_layers, E) selection counts of every token of `windows` ([n, ctx] ids), full causal passes. reach: a dict
    that receives "best_rank" and "max_prob" (n_layers, E) over the same tokens (ExpertSelector.reach)."""
    device = next(model.parameters()).device
    total = None
    for chunk in windows.split(batch):
        out = model(input_ids=chunk.to(device), output_router_logits=True, use_cache=False, logits_to_keep=1)
        counts = selector.counts(out.router_logits).cpu()
        total = counts if total is None else total + counts
        if reach is not None:
            rank, prob = (t.cpu() for t in selector.reach(out.router_logits))
            reach["best_rank"] = rank if "best_rank" not in reach else torch.minimum(reach["best_rank"], rank)
            reach["max_prob"] = prob if "max_prob" not in reach else torch.maximum(reach["max_prob"], prob)
    return total


@dataclass
class BalanceStats:
    """Expert balance of one calibration set."""
    source: str
    n_windows: int
    ctx: int
    counts: np.ndarray                       # (n_layers, E) selections
    layer_ids: list[int] = field(default_factory=list)
    best_rank: np.ndarray | None = None      # (n_layers, E) best rank under the routing rule (reach; 0 = first choice)
    max_prob: np.ndarray | None = None       # (n_layers, E) highest routing probability (reach)

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.ctx

    @property
    def sigma(self) -> float:
        return float(balance_sigma(torch.from_numpy(self.counts)))

    @property
    def layer_sigma(self) -> np.ndarray:
        return layer_sigma(torch.from_numpy(self.counts)).numpy()

    def to_dict(self) -> dict:
        return {"source": self.source, "tokens": self.n_tokens, "windows": self.n_windows, "ctx": self.ctx,
                "sigma": self.sigma, "layers": {str(b): {"sigma": float(s), "min": int(c.min()), "max": int(c.max())}
                                                for b, s, c in zip(self.layer_ids, self.layer_sigma, self.counts)}}


def balance_report(model_dir: str | Path, sources: list[str] | tuple[str, ...], ctx: int | None = None,
                   n_windows: int | None = None, equal_tokens: bool = True, device: str | None = "cpu",
                   model=None, reach: bool = False) -> list[BalanceStats]:
    """Balance of each source (a stdlib split, a .txt/.jsonl file, an EBSS .jsonl) on the model.

    ctx defaults to the shortest EBSS sequence among the sources (else 512); n_windows to the
    windows of the smallest EBSS source (else 32). With equal_tokens every set is truncated to the
    smallest set's window count, so sets are compared at equal token count.
    """
    if not sources:
        raise Moeq2ggufError("balance report: no source given; pass a split name (calib) or a file")
    token_files = {s: read_token_file(s) for s in sources}
    ebss_rows = [rows for rows in token_files.values() if rows]
    if ctx is None:
        ctx = min(len(r) for rows in ebss_rows for r in rows) if ebss_rows else 512
    if n_windows is None:
        n_windows = min(len(rows) for rows in ebss_rows) if ebss_rows else 32
    # EBSS files give their own token ids (one window each); text is cut as the engine cuts it
    windows = {s: token_windows(model_dir, s, n_windows, ctx) for s in sources}
    if equal_tokens:
        n_min = min(w.shape[0] for w in windows.values())
        windows = {s: w[:n_min] for s, w in windows.items()}
    if model is None:
        model = load_model(model_dir, resolve_device(device))
    layer_ids = router_layer_ids(model)
    selector = ExpertSelector.for_model(model, model_dir)
    stats = []
    for s, w in windows.items():
        found = {} if reach else None
        counts = expert_counts(model, w, selector, reach=found)
        stats.append(BalanceStats(s, w.shape[0], w.shape[1], counts.numpy(), layer_ids,
                                  *((found["best_rank"].numpy(), found["max_prob"].numpy()) if reach else ())))
        log.info("balance of %s: %d tokens, sigma %.4f", s, stats[-1].n_tokens, stats[-1].sigma)
    return stats


def format_report(stats: list[BalanceStats]) -> str:
    """Per layer and source: sigma and the least / most selected expert's token count."""
    names = [Path(s.source).name if Path(s.source).suffix else s.source for s in stats]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'layer':>5}" + "".join(f" | {n:>{width}} {'min':>7} {'max':>7}" for n in names),
             f"{'':>5}" + "".join(f" | {'sigma':>{width}} {'tokens':>7} {'tokens':>7}" for _ in names)]
    for i, layer in enumerate(stats[0].layer_ids):
        lines.append(f"{layer:>5}" + "".join(f" | {s.layer_sigma[i]:>{width}.4f} {int(s.counts[i].min()):>7} "
                                             f"{int(s.counts[i].max()):>7}" for s in stats))
    lines.append(f"{'all':>5}" + "".join(f" | {s.sigma:>{width}.4f} {int(s.counts.min()):>7} {int(s.counts.max()):>7}"
                                         for s in stats))
    lines.append(f"{'tok':>5}" + "".join(f" | {s.n_tokens:>{width}d} {'':>7} {'':>7}" for s in stats))
    return "\n".join(lines)


def format_reach(stats: list[BalanceStats], top_k: int, limit: int = 12) -> str:
    """Per source, the experts it never selected, with the best rank and highest routing probability any of its tokens
    gave them: an expert no text reaches shows here for every source (no calibration set can give it tokens)."""
    lines = []
    for s in stats:
        if s.best_rank is None:
            continue
        name = Path(s.source).name if Path(s.source).suffix else s.source
        never = [(layer, e) for i, layer in enumerate(s.layer_ids) for e in np.nonzero(s.counts[i] == 0)[0]]
        lines.append(f"reach of {name} ({s.n_tokens} tokens, top-{top_k} of {s.counts.shape[1]} experts): "
                     + ("every expert of every MoE layer selected at least once" if not never else
                        f"{len(never)} experts never selected (best rank / highest routing probability):"))
        for i, layer in enumerate(s.layer_ids):
            missing = np.nonzero(s.counts[i] == 0)[0]
            if len(missing):
                cells = [f"e{e} {int(s.best_rank[i, e])}/{float(s.max_prob[i, e]):.3f}" for e in missing[:limit]]
                more = f" ... ({len(missing) - limit} more)" if len(missing) > limit else ""
                lines.append(f"  layer {layer}: " + "  ".join(cells) + more)
    return "\n".join(lines)
