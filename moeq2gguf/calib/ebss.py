"""EBSS: expert-balanced self-sampling (MoEQuant; docs/METHODS.md section 5).

The model writes its own calibration text, steered toward balanced expert use:

- each of N sequences starts from one uniformly random non-special token (after BOS when the
  tokenizer adds one, so that the sequence is a calibration window exactly as the engine cuts them);
- w beams per sequence, each with its tokens, cumulative log-probability R, generated length l and
  per-MoE-layer counts of the experts its tokens selected (top-k of the router, every token of the
  beam including the prefix);
- each step expands every beam by its top-`topk` next tokens and scores each candidate

      cost = -R_new / l_new + sigma / tau

  keeps the w lowest-cost candidates (ties broken by beam then candidate order), runs them through
  the model with the KV cache and adds the new token's selections to their counts;
- at L tokens the beam with the lowest final cost -R/l + sigma/tau (its own, complete counts) is kept.

Which sigma (EBSSConfig.balance; both follow the formula, select_candidates takes either):
- "parent": balance.balance_sigma of the parent beam's counts, as docs/METHODS.md writes it. It is the
  same for all candidates of a parent, so it only ranks beams; beam search keeps the w beams close
  relatives (their sigma differs by about 0.001 on the bundled models), and the candidate's own
  experts are unknown when it is chosen. Measured: it lowers sigma a little and never raises the
  least-used expert of the bundled Qwen2-MoE above the calib split's (tools/bench_ebss.py).
- "candidate" (default): sigma of the parent's counts plus the candidate token's own selections,
  from one extra pass per step that runs all w*topk candidates as siblings under a tree attention
  mask on the parent's cached prefix (candidate_counts). The balance term then ranks tokens too;
  on the bundled models it lowers sigma well below the calib split's and raises the least-used
  expert of every layer that any text reaches (three of Mixtral-tiny's experts are selected by no
  text we tried). Cost: that pass is about topk/2 one-token steps of compute (on this 2-core CPU,
  ~20 instead of ~200 tokens/s for the 8M-parameter fixtures).

Other decisions the page left open:
- R sums log-probabilities of the guarded distribution: repetition penalty applied to the logits,
  banned tokens removed, log-softmax renormalised over the rest. l counts generated tokens (the
  random start token and BOS are not scored).
- tau: see DEFAULT_TAU.

Guards against degenerate text, each switchable and counted (EBSSResult.guards: in how many of
the sequence-steps the guard changed which beams were kept, against the same step without it):
- eos: the tokenizer's special tokens (EOS, BOS, pad) are never generated (every sequence is L long);
- ngram: a token that would complete an n-gram (n = 4) already in the beam is banned;
- repetition: a mild repetition penalty (CTRL / transformers style: positive logits of tokens already
  in the beam divided by p, negative ones multiplied by p).
Ids beyond the tokenizer's vocabulary are always banned.

Generation runs all w beams of S sequences as one batch of S*w rows through transformers' own model
(AutoModelForCausalLM, output_router_logits=True) with its DynamicCache, reordered after each step.
A sequence depends on the seed and its index only (its start token), not on the other sequences;
numerics (hence rare ties) can depend on the batch size and the device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeq2gguf.calib.balance import (ExpertSelector, balance_sigma, layer_sigma, load_model, resolve_device,
                                     router_layer_ids)
from moeq2gguf.errors import Moeq2ggufError

log = logging.getLogger(__name__)

# tau, measured on the bundled models (tools/bench_ebss.py, 16 x 256 tokens, balance "candidate"):
# sigma is a std of frequencies that sum to 1, so it is small (0.02-0.13 per beam) and moves
# little per token: over one beam's 64 candidates its std is 0.00017 (Mixtral, 8 experts) and
# 0.00007 (Qwen2-MoE, 16 experts), while the std of -R_new/l_new is 0.008 nat. Set sigma (calib
# split: 0.115 Mixtral, 0.035 Qwen2-MoE) and mean log-prob per token by tau:
#   tau 1.2 (paper): 0.117 / 0.046, -1.07 / -1.31  balance term 50-110x below the log-prob term
#   tau 0.02:        0.081 / 0.027, -2.09 / -1.59  Qwen2-MoE layer 1's least-used expert: 38 vs 36
#   tau 0.01:        0.071 / 0.021, -3.19 / -2.02  every reachable least-used expert well above calib
#   tau 0.005:       0.066 / 0.015, -4.21 / -3.02  Mixtral's text below what it scores real text at
# The models score real text (eval split) at -3.35 / -3.64 nat per token. tau = 0.01 puts the
# balance term at 2x / 0.85x the log-prob term's spread: the strongest balance whose text stays at
# least as likely to the model as real text.
DEFAULT_TAU = 0.01
GUARDS = ("eos", "ngram", "repetition")
BALANCE_MODES = ("parent", "candidate")


@dataclass(frozen=True)
class EBSSConfig:
    """Settings of one EBSS run (recorded in the cache key and the sidecar .json)."""
    n: int = 128                        # sequences
    length: int = 512                   # tokens per sequence, BOS included
    beams: int = 4                      # w
    tau: float = DEFAULT_TAU            # balance temperature; math.inf: plain beam search
    topk: int = 64                      # candidates per beam and step
    seed: int = 0
    eos_guard: bool = True              # never generate special tokens
    ngram_guard: int = 4                # ban tokens completing a repeated n-gram; 0: off
    repetition_penalty: float = 1.1     # 1.0: off
    batch_sequences: int = 8            # sequences per batch (of batch_sequences * beams rows)
    balance: str = "candidate"          # sigma of each candidate (default) or of its parent (docs/METHODS.md)

    def __post_init__(self) -> None:
        if self.n < 1 or self.length < 3:
            raise Moeq2ggufError(f"EBSS needs at least one sequence of 3+ tokens (got --n {self.n} --len {self.length})")
        if self.beams < 1 or self.topk < 1:
            raise Moeq2ggufError(f"EBSS needs --beams >= 1 and --topk >= 1 (got {self.beams}, {self.topk})")
        if not self.tau > 0:
            raise Moeq2ggufError(f"--tau {self.tau} must be positive (small: strong balance; inf: plain beam search)")
        if self.ngram_guard == 1 or self.ngram_guard < 0:
            raise Moeq2ggufError(f"n-gram guard {self.ngram_guard}: use n >= 2 (4 by default) or 0 to switch it off")
        if not self.repetition_penalty >= 1.0:
            raise Moeq2ggufError(f"--repetition-penalty {self.repetition_penalty} must be >= 1.0 (1.0 switches it off)")
        if self.balance not in BALANCE_MODES:
            raise Moeq2ggufError(f"--balance {self.balance} is unknown; choose one of {', '.join(BALANCE_MODES)}")
        if self.batch_sequences < 1:
            raise Moeq2ggufError(f"batch_sequences {self.batch_sequences} must be >= 1")


@dataclass
class EBSSResult:
    """Generated sequences and how they were made."""
    config: EBSSConfig
    ids: torch.Tensor                       # (n, length) int64, BOS first when the tokenizer adds one
    texts: list[str]
    mean_logprob: list[float]               # R / l of each kept beam
    sigma: list[float]                      # balance of each kept beam
    counts: np.ndarray                      # (n_moe_layers, E) selections over the whole set
    layer_ids: list[int]
    guards: dict[str, dict]                 # guard -> {"changed": steps, "of": steps, "fraction": ...}
    scale: dict[str, float]                 # magnitudes for choosing tau
    seconds: float
    output: Path | None = None

    @property
    def set_sigma(self) -> float:
        return float(balance_sigma(torch.from_numpy(self.counts)))

    @property
    def tokens_per_s(self) -> float:
        return self.ids.numel() / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        return {"config": asdict(self.config), "sequences": int(self.ids.shape[0]), "length": int(self.ids.shape[1]),
                "set_sigma": self.set_sigma, "mean_beam_sigma": float(np.mean(self.sigma)),
                "mean_logprob": float(np.mean(self.mean_logprob)),
                "layer_sigma": dict(zip(map(str, self.layer_ids), layer_sigma(torch.from_numpy(self.counts)).tolist())),
                "guards": self.guards, "scale": self.scale, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


def select_candidates(R: torch.Tensor, sigma: torch.Tensor, cand_logp: torch.Tensor, n_generated: int, tau: float,
                      beams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EBSS step for S sequences: keep the `beams` lowest-cost candidates of each sequence.

    R: (S, w) cumulative log-probability of each parent beam (-inf: no such beam);
    sigma: (S, w) balance of each parent, or (S, w, K) of each candidate; cand_logp: (S, w, K) log-probability of each parent's K
    candidate tokens (-inf: banned); n_generated: l of the parents, so l_new = n_generated + 1.
    cost = -R_new / l_new + sigma / tau, R_new = R + cand_logp.
    Returns (parent (S, beams) in [0, w), candidate (S, beams) in [0, K), cost (S, beams),
    R_new (S, beams)), lowest cost first; ties keep the earlier parent, then the earlier candidate.
    """
    S, w, K = cand_logp.shape
    R_new = (R.to(torch.float64)[..., None] + cand_logp.to(torch.float64)).reshape(S, w * K)
    balance = sigma.to(torch.float64) / tau if math.isfinite(tau) else torch.zeros_like(sigma, dtype=torch.float64)
    balance = balance.reshape(S, w * K) if balance.dim() == 3 else balance.repeat_interleave(K, dim=1)
    cost = -R_new / (n_generated + 1) + balance
    cost = torch.where(torch.isnan(cost), torch.inf, cost)           # -inf log-prob: never chosen
    order = torch.sort(cost, dim=1, stable=True).indices[:, :beams]
    return order // K, order % K, cost.gather(1, order), R_new.gather(1, order)


def repeated_ngram_bans(tokens: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """(B, V) bool: tokens that would complete an n-gram already present in each row of tokens (B, t)."""
    B, t = tokens.shape
    ban = torch.zeros(B, vocab, dtype=torch.bool, device=tokens.device)
    if t < n:
        return ban
    prefix = tokens[:, t - (n - 1):]                                   # (B, n-1): the open n-gram
    match = torch.ones(B, t - n + 1, dtype=torch.bool, device=tokens.device)
    for j in range(n - 1):                                             # match[b, s]: tokens[s:s+n-1] == prefix
        match &= tokens[:, j:j + t - n + 1] == prefix[:, j:j + 1]
    rows, starts = match.nonzero(as_tuple=True)
    ban[rows, tokens[rows, starts + n - 1]] = True
    return ban


def guarded_logprobs(logits: torch.Tensor, always_banned: torch.Tensor, special: torch.Tensor | None,
                     ngram_ban: torch.Tensor | None, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """(B, V) log-probabilities after the repetition penalty (when seen is given) and bans."""
    x = logits.float()
    if seen is not None and penalty != 1.0:
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    ban = always_banned.expand_as(x)
    if special is not None:
        ban = ban | special
    if ngram_ban is not None:
        ban = ban | ngram_ban
    return torch.log_softmax(x.masked_fill(ban, -torch.inf), dim=-1)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    return ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def has_sliding_window(config) -> bool:
    """Whether some attention layer of the model is a sliding-window one (GPT-OSS alternates them)."""
    return "sliding_attention" in (getattr(config, "layer_types", None) or ()) or \
        bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
             and getattr(config, "model_type", "") == "gpt_oss")


def cache_cannot_crop(config) -> str | None:
    """Why transformers' cache of this model cannot drop appended tokens again (None: it can): sliding-window
    layers once the window is full, recurrent (linear-attention) layers always."""
    if has_sliding_window(config):
        return "sliding-window attention layers"
    if "linear_attention" in (getattr(config, "layer_types", None) or ()):
        return "linear-attention (recurrent) layers"
    return None


def start_tokens(n: int, seed: int, allowed: np.ndarray) -> list[int]:
    """Sequence i starts from allowed[rng(seed, i)]: independent of batching and of n."""
    return [int(allowed[np.random.default_rng([seed, i]).integers(len(allowed))]) for i in range(n)]


@contextmanager
def recorded_router_logits(model) -> Iterator[list[torch.Tensor]]:
    """Router logits of every router call while the block runs, in call order (forward hooks on the
    modules transformers itself records router_logits from; removed on exit)."""
    target = model.model._can_record_outputs["router_logits"].target_class
    calls: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append(out[0])) for m in model.modules()
             if isinstance(m, target)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def candidate_counts(model, cache, candidates: torch.Tensor, selector: ExpertSelector) -> torch.Tensor:
    """(B, K, n_layers, E) expert selections of each of K candidate next tokens of each of B rows.

    One forward of the (B, K) candidates as siblings in a tree: each attends to its row's cached
    prefix and to itself only, all at the same position; the K cache entries it appends are then
    cropped. Equals K separate one-token steps (to float rounding; tests check it).
    """
    B, K = candidates.shape
    t = cache.get_seq_length()
    dtype = next(model.parameters()).dtype
    mask = torch.full((B, 1, K, t + K), torch.finfo(dtype).min, dtype=dtype, device=candidates.device)
    mask[..., :t] = 0
    diag = torch.arange(K, device=candidates.device)
    mask[:, :, diag, t + diag] = 0
    position_ids = torch.full((B, K), t, dtype=torch.int64, device=candidates.device)
    # transformers' own aux-loss code cannot take a 4-D mask, hence hooks instead of output_router_logits
    with recorded_router_logits(model) as calls:
        model(input_ids=candidates, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    cache.crop(-K)
    return selector.counts(calls, n_rows=B * K).view(B, K, len(calls), selector.n_experts)


def _masked_std(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Population std over the last dim of the entries where ok (rows with none give 0)."""
    n = ok.sum(-1).clamp_min(1)
    x = torch.where(ok, x, 0.0)
    mean = x.sum(-1) / n
    return (torch.where(ok, (x - mean[:, None]) ** 2, 0.0).sum(-1) / n).sqrt()


class _Stats:
    """Guard firing counts and the magnitudes tau is judged against, accumulated over steps."""

    def __init__(self) -> None:
        self.changed = {g: 0 for g in GUARDS}
        self.decisions = 0
        self.nll_spread: list[float] = []    # max - min of -R/l over a sequence's live beams
        self.sigma_spread: list[float] = []  # max - min of sigma over the same beams
        self.nll: list[float] = []
        self.sigma: list[float] = []
        self.token_gap: list[float] = []     # -R_new/l_new of the w-th kept minus the best candidate
        self.cand_nll_std: list[float] = []  # std of -R_new/l_new over one beam's candidates
        self.cand_sigma_std: list[float] = []  # std of sigma(candidate) over the same candidates


@torch.no_grad()
def _generate_batch(model, prefixes: torch.Tensor, cfg: EBSSConfig, always_banned: torch.Tensor,
                    special_mask: torch.Tensor, selector: ExpertSelector, stats: _Stats,
                    bar: tqdm | None, finished: list[torch.Tensor]) -> list[dict]:
    """EBSS for S sequences given their (S, p) prefixes; returns one dict per sequence."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    S, p = prefixes.shape
    w, L = cfg.beams, cfg.length
    B = S * w
    tokens = torch.zeros(B, L, dtype=torch.int64, device=device)
    tokens[:, :p] = prefixes.to(device).repeat_interleave(w, dim=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=tokens[:, :p], past_key_values=cache, use_cache=True, output_router_logits=True,
                logits_to_keep=1)
    counts = selector.counts(out.router_logits, n_rows=B)      # (B, n_layers, E)
    logits = out.logits[:, -1, :]
    V = logits.shape[-1]
    K = min(cfg.topk, V)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    seen.scatter_(1, tokens[:, :p], True)
    R = torch.zeros(S, w, dtype=torch.float64, device=device)
    R[:, 1:] = -torch.inf                      # at the start all w beams are the same: expand one
    sigma = balance_sigma(counts).view(S, w)
    use_seen = cfg.repetition_penalty != 1.0

    for t in range(p, L):
        ngram = repeated_ngram_bans(tokens[:, :t], cfg.ngram_guard, V) if cfg.ngram_guard else None
        special = special_mask if cfg.eos_guard else None
        on = {"eos": special, "ngram": ngram, "repetition": seen if use_seen else None}
        logp = guarded_logprobs(logits, always_banned, on["eos"], on["ngram"], on["repetition"], cfg.repetition_penalty)
        vals, idx = logp.topk(K, dim=-1)                                  # (B, K)
        score_sigma = sigma
        if cfg.balance == "candidate":                                    # each candidate's own balance
            cand_sigma = balance_sigma(counts[:, None] + candidate_counts(model, cache, idx, selector))
            score_sigma = cand_sigma.view(S, w, K)
        parent, cand, cost, R_new = select_candidates(R, score_sigma, vals.view(S, w, K), t - p, cfg.tau, w)
        if not torch.isfinite(cost).all():
            raise Moeq2ggufError(f"EBSS: fewer than {w} allowed candidates at token {t}; raise --topk or relax the guards")
        chosen = idx.view(S, w, K)[torch.arange(S, device=device)[:, None], parent, cand]   # (S, w)

        # guard accounting: would this step have kept other beams without the guard?
        key = torch.sort(parent * V + chosen, dim=1).values
        for g in GUARDS:
            if on[g] is None:
                continue
            off = dict(on, **{g: None})
            lp = guarded_logprobs(logits, always_banned, off["eos"], off["ngram"], off["repetition"], cfg.repetition_penalty)
            v2, i2 = lp.topk(K, dim=-1)
            cf_sigma = sigma
            if cfg.balance == "candidate":
                # candidates the guarded step looked ahead at keep their sigma; others (that only the
                # unguarded ranking brings in) are scored with their parent's: an approximation
                cf_sigma = sigma[..., None].expand(S, w, K).clone().view(B, K)
                same = i2[:, :, None] == idx[:, None, :]                  # (B, K, K)
                hit = same.any(-1)
                cf_sigma[hit] = cand_sigma.view(B, K)[torch.nonzero(hit, as_tuple=True)[0], same.float().argmax(-1)[hit]]
                cf_sigma = cf_sigma.view(S, w, K)
            p2, c2, _, _ = select_candidates(R, cf_sigma, v2.view(S, w, K), t - p, cfg.tau, w)
            ch2 = i2.view(S, w, K)[torch.arange(S, device=device)[:, None], p2, c2]
            stats.changed[g] += int((torch.sort(p2 * V + ch2, dim=1).values != key).any(1).sum())
        stats.decisions += S
        live = torch.isfinite(R)
        if live.all():
            nll = -R / max(t - p, 1)
            stats.nll_spread.extend((nll.max(1).values - nll.min(1).values).tolist())
            stats.sigma_spread.extend((sigma.max(1).values - sigma.min(1).values).tolist())
            stats.nll.extend(nll.mean(1).tolist())
            stats.sigma.extend(sigma.mean(1).tolist())
            stats.token_gap.extend((-R_new[:, -1] / (t - p + 1) + R_new[:, 0] / (t - p + 1)).tolist())
            if cfg.balance == "candidate":                                # spreads over a beam's candidates
                nll_c = (-(R[..., None] + vals.view(S, w, K).double()) / (t - p + 1)).view(B, K)
                ok = torch.isfinite(nll_c)
                stats.cand_nll_std.extend(_masked_std(nll_c, ok).tolist())
                stats.cand_sigma_std.extend(_masked_std(score_sigma.reshape(B, K), ok).tolist())

        rows = (parent + torch.arange(S, device=device)[:, None] * w).flatten()
        tokens = tokens[rows]
        tokens[:, t] = chosen.flatten()
        seen = seen[rows]
        seen[torch.arange(B, device=device), tokens[:, t]] = True
        counts = counts[rows]
        R = R_new
        cache.reorder_cache(rows)
        # the new token's own router decisions (also for the last token: its counts decide the winner)
        out = model(input_ids=tokens[:, t:t + 1], past_key_values=cache, use_cache=True, output_router_logits=True)
        counts += selector.counts(out.router_logits, n_rows=B)
        logits = out.logits[:, -1, :]
        sigma = balance_sigma(counts).view(S, w)
        if bar is not None:
            bar.update(S)
            if t % 16 == 0 or t == L - 1:
                best = sigma.min(1).values.mean().item()
                done = torch.stack(finished).sum(0) if finished else None
                bar.set_postfix_str(f"beam sigma {best:.4f}" + (f", set sigma {balance_sigma(done).item():.4f}" if done is not None else ""),
                                    refresh=False)

    n_gen = L - p
    final = -R / n_gen + (sigma / cfg.tau if math.isfinite(cfg.tau) else 0.0)
    best = torch.argmin(final, dim=1)                                    # first of equal costs
    results = []
    for s in range(S):
        row = s * w + int(best[s])
        finished.append(counts[row].cpu())
        results.append({"ids": tokens[row].cpu(), "mean_logprob": float(R[s, best[s]]) / n_gen,
                        "sigma": float(sigma[s, best[s]]), "counts": counts[row].cpu()})
    del cache
    return results


def generate_ebss(model_dir: str | Path, output: str | Path | None = None, config: EBSSConfig | None = None,
                  device: str | None = None, progress: bool | None = True, model=None, tokenizer=None) -> EBSSResult:
    """Generate EBSS calibration data; write it as .jsonl ({"text", "ids", "mean_logprob", "sigma"} per
    line) plus a sidecar .json of the settings and statistics when `output` is given.

    device: "cpu", "cuda[:i]", or None for the GPU when present. model/tokenizer: already loaded
    ones (tests, benchmarks); by default transformers' own model from model_dir, in float32.
    """
    from transformers import AutoTokenizer

    cfg = config or EBSSConfig()
    dev = resolve_device(device) if model is None else next(model.parameters()).device
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
    model = model if model is not None else load_model(model_dir, dev)
    selector = ExpertSelector.for_model(model, model_dir)
    uncroppable = cache_cannot_crop(model.config)
    if cfg.balance == "candidate" and uncroppable:
        # the candidates' tree pass appends K tokens to the cache and crops them again, which transformers' sliding-
        # window cache layers cannot undo once the window is full, nor recurrent layers ever: rank by the parent
        # beam's balance there
        log.warning("EBSS: %s has %s; balancing by each parent beam's sigma (--balance parent) instead of each "
                    "candidate's", model.config.model_type, uncroppable)
        cfg = dataclasses.replace(cfg, balance="parent")
    layer_ids = router_layer_ids(model)
    V = model.get_output_embeddings().weight.shape[0]
    special = sorted(i for i in _special_ids(tokenizer) if i < V)
    n_tok = min(len(tokenizer), V)
    allowed = np.array([i for i in range(n_tok) if i not in set(special)], dtype=np.int64)
    if len(allowed) < cfg.beams:
        raise Moeq2ggufError(f"vocabulary of {model_dir} has {len(allowed)} non-special tokens; EBSS needs more than --beams")
    always_banned = torch.zeros(1, V, dtype=torch.bool, device=dev)
    always_banned[0, n_tok:] = True
    special_mask = torch.zeros(1, V, dtype=torch.bool, device=dev)
    special_mask[0, special] = True
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    starts = start_tokens(cfg.n, cfg.seed, allowed)
    if len(bos) + 1 >= cfg.length:
        raise Moeq2ggufError(f"--len {cfg.length} leaves no token to generate after the prefix; use --len 3 or more")

    stats = _Stats()
    finished: list[torch.Tensor] = []
    results: list[dict] = []
    t0 = time.perf_counter()
    # progress None: a bar only on a terminal (tqdm's own rule)
    bar = tqdm(total=cfg.n * cfg.length, desc="ebss", unit="tok", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    for lo in range(0, cfg.n, cfg.batch_sequences):
        chunk = starts[lo:lo + cfg.batch_sequences]
        prefixes = torch.tensor([bos + [s] for s in chunk], dtype=torch.int64)
        bar.update(prefixes.numel())
        results += _generate_batch(model, prefixes, cfg, always_banned, special_mask, selector, stats, bar, finished)
    bar.close()
    seconds = time.perf_counter() - t0

    ids = torch.stack([r["ids"] for r in results])
    texts = [tokenizer.decode(r["ids"].tolist(), skip_special_tokens=True) for r in results]
    counts = torch.stack([r["counts"] for r in results]).sum(0).numpy()
    guards = {g: {"enabled": enabled, "changed": stats.changed[g], "of": stats.decisions,
                  "fraction": stats.changed[g] / max(stats.decisions, 1)}
              for g, enabled in (("eos", cfg.eos_guard), ("ngram", cfg.ngram_guard > 0),
                                 ("repetition", cfg.repetition_penalty != 1.0))}
    med = (lambda xs: float(np.median(xs)) if xs else float("nan"))
    scale = {"median_beam_nll_spread": med(stats.nll_spread), "median_beam_sigma_spread": med(stats.sigma_spread),
             "mean_nll": float(np.mean(stats.nll)) if stats.nll else float("nan"),
             "mean_beam_sigma": float(np.mean(stats.sigma)) if stats.sigma else float("nan"),
             "median_kept_candidate_gap": med(stats.token_gap)}
    scale["median_candidate_nll_std"] = med(stats.cand_nll_std)
    scale["median_candidate_sigma_std"] = med(stats.cand_sigma_std)
    scale["tau_equal_weight"] = scale["median_beam_sigma_spread"] / scale["median_beam_nll_spread"] \
        if scale["median_beam_nll_spread"] else float("nan")
    result = EBSSResult(cfg, ids, texts, [r["mean_logprob"] for r in results], [r["sigma"] for r in results],
                        counts, layer_ids, guards, scale, seconds)
    log.info("EBSS: %d x %d tokens in %.1f s (%.0f tok/s), set sigma %.4f", ids.shape[0], ids.shape[1], seconds,
             result.tokens_per_s, result.set_sigma)
    if output is not None:
        result.output = write_ebss(result, output)
    return result


def write_ebss(result: EBSSResult, output: str | Path) -> Path:
    """Write the .jsonl (atomically: temporary file, then rename) and its sidecar .json."""
    out = Path(output)
    if out.suffix != ".jsonl":
        raise Moeq2ggufError(f"EBSS output {out} must end in .jsonl (one {{\"text\", \"ids\"}} record per line)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for ids, text, lp, sg in zip(result.ids.tolist(), result.texts, result.mean_logprob, result.sigma):
            fh.write(json.dumps({"text": text, "ids": ids, "mean_logprob": round(lp, 6), "sigma": round(sg, 6)}) + "\n")
    os.replace(tmp, out)
    sidecar = sidecar_path(out)   # never calib.json next to calib.jsonl: a file the user may own
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(result.summary(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, sidecar)
    return out


def sidecar_path(output: str | Path) -> Path:
    """The settings and statistics of an EBSS file: OUT.jsonl -> OUT.jsonl.ebss.json."""
    return Path(f"{output}.ebss.json")


def cache_dir() -> Path:
    """$MOEQ2GGUF_CACHE/ebss, else ~/.cache/moeq2gguf/ebss."""
    root = os.environ.get("MOEQ2GGUF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moeq2gguf") / "ebss"


def model_fingerprint(model_dir: str | Path) -> str:
    """The checkpoint's fingerprint (io/fingerprint.py: names, sizes, mtimes, headers, sampled blocks; tokenizer
    and config files whole)."""
    from moeq2gguf.io.fingerprint import checkpoint_fingerprint
    return checkpoint_fingerprint(model_dir)


def cache_path(model_dir: str | Path, config: EBSSConfig, device: torch.device) -> Path:
    key = json.dumps({"model": model_fingerprint(model_dir), "config": asdict(config), "device": device.type},
                     sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jsonl"


def cached_ebss(model_dir: str | Path, config: EBSSConfig, device: str | None = None, progress: bool | None = None) -> Path:
    """The .jsonl of an EBSS run with these settings on this model, generated once and then reused.

    The key hashes the checkpoint's safetensors, config and tokenizer, every EBSS setting and the
    device type (numerics differ between CPU and GPU).
    """
    dev = resolve_device(device)
    path = cache_path(model_dir, config, dev)
    if path.is_file():
        log.info("EBSS: reusing %s", path)
        return path
    log.info("EBSS: generating %d x %d tokens into %s", config.n, config.length, path)
    generate_ebss(model_dir, path, config, device=str(dev), progress=progress)
    return path
