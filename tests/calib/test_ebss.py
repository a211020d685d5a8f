"""EBSS: the objective by hand, the guards, and small end-to-end runs on tiny random models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moeq2gguf import cli
from moeq2gguf.calib import ebss as ebss_mod
from moeq2gguf.calib.balance import ExpertSelector, balance_sigma, expert_counts
from moeq2gguf.calib.ebss import (EBSSConfig, generate_ebss, guarded_logprobs, repeated_ngram_bans,
                                  select_candidates, start_tokens)
from moeq2gguf.calib.sources import calibration_windows
from moeq2gguf.errors import Moeq2ggufError
from testing import random_model, save_checkpoint

from .conftest import biased_mixtral

# Two parent beams, three candidates each, two beams kept. Parents have written l = 2 tokens.
R = torch.tensor([[-2.0, -1.0]])                     # beam 1 is the likelier one ...
SIGMA = torch.tensor([[0.01, 0.05]])                 # ... beam 0 the better balanced one
CAND = torch.tensor([[[-0.1, -0.5, -2.0],
                      [-0.2, -0.3, -1.5]]])
#   R_new:        beam 0: -2.1 -2.5 -4.0     beam 1: -1.2 -1.3 -2.5
#   -R_new / 3:           0.700 0.833 1.333          0.400 0.433 0.833


def test_objective_hand_computed_balance_wins():
    # tau = 0.1: + 0.1 for beam 0, + 0.5 for beam 1
    #   costs beam 0: 0.800 0.933 1.433   beam 1: 0.900 0.933 1.333 -> keep (0, 0) then (1, 0)
    parent, cand, cost, R_new = select_candidates(R, SIGMA, CAND, n_generated=2, tau=0.1, beams=2)
    assert parent.tolist() == [[0, 1]] and cand.tolist() == [[0, 0]]
    assert cost[0].tolist() == pytest.approx([2.1 / 3 + 0.1, 1.2 / 3 + 0.5])
    assert R_new[0].tolist() == pytest.approx([-2.1, -1.2])


def test_objective_hand_computed_likelihood_wins():
    # tau = 1.2 (the paper's): + 0.00833 and + 0.04167
    #   costs beam 0: 0.708 0.842 1.342   beam 1: 0.442 0.475 0.875 -> keep (1, 0) then (1, 1)
    parent, cand, cost, _ = select_candidates(R, SIGMA, CAND, n_generated=2, tau=1.2, beams=2)
    assert parent.tolist() == [[1, 1]] and cand.tolist() == [[0, 1]]
    assert cost[0].tolist() == pytest.approx([1.2 / 3 + 0.05 / 1.2, 1.3 / 3 + 0.05 / 1.2])
    # tau = inf is plain beam search on the mean log-probability
    parent, cand, _, _ = select_candidates(R, SIGMA, CAND, n_generated=2, tau=math.inf, beams=2)
    assert parent.tolist() == [[1, 1]] and cand.tolist() == [[0, 1]]


def test_objective_hand_computed_candidate_balance():
    # sigma of each candidate (its parent's counts plus its own token's experts), tau = 0.1:
    #   beam 0: 0.700+0.30 0.833+0.05 1.333+0.01 = 1.000 0.883 1.343
    #   beam 1: 0.400+0.60 0.433+0.50 0.833+0.02 = 1.000 0.933 0.853 -> keep (1, 2) then (0, 1)
    sigma = torch.tensor([[[0.030, 0.005, 0.001],
                           [0.060, 0.050, 0.002]]])
    parent, cand, cost, R_new = select_candidates(R, sigma, CAND, n_generated=2, tau=0.1, beams=2)
    assert list(zip(parent[0].tolist(), cand[0].tolist())) == [(1, 2), (0, 1)]
    assert cost[0].tolist() == pytest.approx([2.5 / 3 + 0.02, 2.5 / 3 + 0.05])
    assert R_new[0].tolist() == pytest.approx([-2.5, -2.5])


def test_objective_matches_formula_on_random_numbers():
    g = torch.Generator().manual_seed(1)
    S, w, K, l, tau = 3, 4, 5, 7, 0.3
    R_ = -torch.rand(S, w, generator=g, dtype=torch.float64) * 10
    sigma = torch.rand(S, w, generator=g, dtype=torch.float64) * 0.2
    cand = -torch.rand(S, w, K, generator=g, dtype=torch.float64) * 5
    cand[0, 1, 2] = -math.inf                                            # a banned token
    R_[2, 3] = -math.inf                                                 # a dead beam
    parent, idx, cost, _ = select_candidates(R_, sigma, cand, l, tau, w)
    for s in range(S):
        brute = sorted((-(R_[s, b] + cand[s, b, k]).item() / (l + 1) + sigma[s, b].item() / tau, b, k)
                       for b in range(w) for k in range(K))
        assert [(b, k) for _, b, k in brute[:w]] == list(zip(parent[s].tolist(), idx[s].tolist()))
        assert cost[s].tolist() == pytest.approx([c for c, _, _ in brute[:w]])
    assert torch.isfinite(cost).all()


def test_ties_keep_the_earlier_beam():
    parent, cand, _, _ = select_candidates(torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2, 2), -1.0), 0, 1.0, 3)
    assert list(zip(parent[0].tolist(), cand[0].tolist())) == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_candidate_lookahead_equals_single_steps(family, tmp_path, small_tokenizers):
    """The tree-masked pass over K candidates gives each candidate the experts a plain one-token
    step gives it, and leaves the cache as it was."""
    from transformers import DynamicCache
    model = random_model(family, seed=2)
    selector = ExpertSelector.for_model(model, save_checkpoint(model, small_tokenizers[family], tmp_path / family))
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 512, (3, 9), generator=g)
    cand = torch.randint(0, 512, (3, 5), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
        got = ebss_mod.candidate_counts(model, cache, cand, selector)
        assert cache.get_seq_length() == 9
        for k in range(5):
            ref = model(input_ids=torch.cat([prefix, cand[:, k:k + 1]], 1), output_router_logits=True, use_cache=False)
            last = tuple(r.view(3, 10, -1)[:, -1] for r in ref.router_logits)
            assert torch.equal(got[:, k], selector.counts(last, n_rows=3))


def test_repeated_ngram_bans():
    tokens = torch.tensor([[5, 6, 7, 8, 1, 5, 6, 7],      # open 3-gram 5 6 7 was followed by 8: ban 8
                           [1, 2, 3, 1, 2, 3, 1, 2]])     # open 1 2 3? no: open is 3 1 2 -> followed by 3: ban 3
    ban = repeated_ngram_bans(tokens, 4, 10)
    assert ban[0].nonzero().flatten().tolist() == [8]
    assert ban[1].nonzero().flatten().tolist() == [3]
    assert not repeated_ngram_bans(tokens[:, :3], 4, 10).any()


def test_guarded_logprobs_penalty_and_bans():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    never = torch.tensor([[False, False, False, True]])
    lp = guarded_logprobs(logits, never, None, None, seen, 2.0)
    # 2.0 -> 1.0 (positive: divided), -1.0 -> -2.0 (negative: multiplied), token 3 banned
    expected = torch.log_softmax(torch.tensor([1.0, -2.0, 0.5]), 0)
    assert lp[0, :3].tolist() == pytest.approx(expected.tolist())
    assert lp[0, 3] == -math.inf


def test_config_errors():
    with pytest.raises(Moeq2ggufError, match="--tau"):
        EBSSConfig(tau=0)
    with pytest.raises(Moeq2ggufError, match="n-gram guard 1"):
        EBSSConfig(ngram_guard=1)
    with pytest.raises(Moeq2ggufError, match="--repetition-penalty 0.9"):
        EBSSConfig(repetition_penalty=0.9)


def _run(checkpoint, tokenizer, model, **kw):
    cfg = EBSSConfig(**{"n": 4, "length": 40, "batch_sequences": 2, **kw})
    return generate_ebss(checkpoint, None, cfg, progress=False, model=model, tokenizer=tokenizer)


def _repeated_4grams(ids: list[int]) -> int:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(grams) - len(set(grams))


def test_end_to_end_biased_router(biased_checkpoint, small_tokenizers):
    tok = small_tokenizers["mixtral"]
    model = biased_mixtral()
    result = _run(biased_checkpoint, tok, model)
    ids = result.ids
    assert ids.shape == (4, 40) and ids.dtype == torch.int64
    assert (ids[:, 0] == tok.bos_token_id).all()                      # Mixtral's tokenizer adds BOS
    assert ids[:, 1].tolist() == start_tokens(4, 0, torch.arange(2, 512).numpy())   # <s>, </s> are 0 and 1
    special = set(tok.all_special_ids)
    assert not any(t in special for t in ids[:, 1:].flatten().tolist())
    assert all(_repeated_4grams(row) == 0 for row in ids.tolist())
    assert len(result.texts) == 4 and all(isinstance(t, str) and t for t in result.texts)
    # the counts tracked through the KV cache are those of a full pass over the kept sequences
    selector = ExpertSelector.for_model(model, biased_checkpoint)
    full = expert_counts(model, ids, selector)
    assert torch.from_numpy(result.counts).sub(full).abs().sum().item() <= 2
    per_seq = torch.stack([expert_counts(model, ids[i:i + 1], selector) for i in range(4)])
    assert balance_sigma(per_seq).tolist() == pytest.approx(result.sigma, abs=2e-3)
    assert all(-15 < lp < 0 for lp in result.mean_logprob)
    assert set(result.guards) == {"eos", "ngram", "repetition"}
    assert all(g["enabled"] and g["of"] == 4 * 38 for g in result.guards.values())
    # deterministic for a seed; another seed starts elsewhere
    again = _run(biased_checkpoint, tok, model)
    assert torch.equal(again.ids, ids)
    other = _run(biased_checkpoint, tok, model, seed=1)
    assert not torch.equal(other.ids[:, 1], ids[:, 1])


def test_balance_term_lowers_sigma(biased_checkpoint, small_tokenizers):
    """With sigma(parent), a small tau gives better balanced beams (and set) than plain beam search."""
    tok, model = small_tokenizers["mixtral"], random_model("mixtral")
    balanced = _run(biased_checkpoint, tok, model, tau=0.02, balance="parent")
    plain = _run(biased_checkpoint, tok, model, tau=math.inf, balance="parent")
    assert sum(balanced.sigma) / 4 < sum(plain.sigma) / 4 - 0.02
    assert balanced.set_sigma < plain.set_sigma
    assert sum(balanced.mean_logprob) < sum(plain.mean_logprob)


def test_candidate_balance_is_stronger(biased_checkpoint, small_tokenizers):
    tok, model = small_tokenizers["mixtral"], random_model("mixtral")
    parent = _run(biased_checkpoint, tok, model, tau=0.02, balance="parent")
    candidate = _run(biased_checkpoint, tok, model, tau=0.02, balance="candidate")
    assert candidate.set_sigma < parent.set_sigma / 2
    assert all(_repeated_4grams(row) == 0 for row in candidate.ids.tolist())
    assert torch.equal(_run(biased_checkpoint, tok, model, tau=0.02, balance="candidate").ids, candidate.ids)
    assert candidate.scale["median_candidate_sigma_std"] > 0


@pytest.mark.parametrize("balance", ["parent", "candidate"])
def test_each_step_follows_the_objective(biased_checkpoint, small_tokenizers, monkeypatch, balance):
    """Two beams, three candidates, on the biased model: every step's kept beams are the two
    lowest -R_new/l_new + sigma(parent)/tau, recomputed here by brute force from the step's inputs."""
    tok, model = small_tokenizers["mixtral"], biased_mixtral()
    steps = []
    real = ebss_mod.select_candidates

    def checked(R_, sigma, cand, n_generated, tau, beams):
        out = real(R_, sigma, cand, n_generated, tau, beams)
        steps.append((R_.clone(), sigma.clone(), cand.clone(), n_generated, tau, [o.clone() for o in out]))
        return out
    monkeypatch.setattr(ebss_mod, "select_candidates", checked)
    _run(biased_checkpoint, tok, model, n=2, length=12, beams=2, topk=3, tau=0.05, balance=balance)
    kept = [s for s in steps if s[2].shape == (2, 2, 3)]
    assert len(kept) >= 9                       # 10 generated tokens (guard counterfactuals add more calls)
    balance_decided = 0
    for R_, sigma, cand, l, tau, (parent, idx, cost, _) in kept:
        for s in range(2):
            sig = (lambda b, k: sigma[s, b].item()) if sigma.dim() == 2 else (lambda b, k: sigma[s, b, k].item())
            costs = {(b, k): -(R_[s, b].item() + cand[s, b, k].item()) / (l + 1) + sig(b, k) / tau
                     for b in range(2) for k in range(3)}
            best = sorted(costs, key=lambda bk: (costs[bk], bk))[:2]
            assert list(zip(parent[s].tolist(), idx[s].tolist())) == best
            likeliest = sorted(costs, key=lambda bk: (-(R_[s, bk[0]] + cand[s, bk[0], bk[1]]).item(), bk))[:2]
            balance_decided += best != likeliest
    assert balance_decided > 0                  # on this router the balance term does change choices


def test_guards_fire_and_hold(tmp_path, small_tokenizers):
    """A model that wants EOS then one fixed loop of tokens: each guard is what keeps them out."""
    tok = small_tokenizers["mixtral"]
    model = biased_mixtral()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0
        model.lm_head.weight[tok.eos_token_id, 0] = 30.0                # EOS on top everywhere
        for t in (100, 101):                                              # then 100 / 101, as a loop
            model.lm_head.weight[t, 0] = 20.0
    ckpt = save_checkpoint(model, tok, tmp_path / "loopy")
    guarded = _run(ckpt, tok, model, repetition_penalty=1.0)
    assert tok.eos_token_id not in guarded.ids[:, 1:].flatten().tolist()
    assert all(_repeated_4grams(row) == 0 for row in guarded.ids.tolist())
    assert guarded.guards["eos"]["changed"] == guarded.guards["eos"]["of"]       # every step
    assert guarded.guards["ngram"]["changed"] > 0
    assert not guarded.guards["repetition"]["enabled"] and guarded.guards["repetition"]["changed"] == 0
    loose = _run(ckpt, tok, model, eos_guard=False, ngram_guard=0, repetition_penalty=1.0)
    assert tok.eos_token_id in loose.ids[:, 1:].flatten().tolist()
    assert any(_repeated_4grams(row) > 0 for row in loose.ids.tolist())
    assert all(not g["enabled"] and g["changed"] == 0 for g in loose.guards.values())
    penalised = _run(ckpt, tok, model, eos_guard=False, ngram_guard=0, repetition_penalty=3.0)
    assert penalised.guards["repetition"]["changed"] > 0


def test_jsonl_feeds_the_engine_and_ebss_source_is_cached(tmp_path, monkeypatch, biased_checkpoint, small_tokenizers):
    tok = small_tokenizers["mixtral"]
    out = tmp_path / "calib.jsonl"
    result = generate_ebss(biased_checkpoint, out, EBSSConfig(n=3, length=24, batch_sequences=3), device="cpu",
                           progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ids"] for r in records] == result.ids.tolist()
    assert records[0]["text"] == tok.decode(records[0]["ids"], skip_special_tokens=True)
    assert json.loads(ebss_mod.sidecar_path(out).read_text())["set_sigma"] == pytest.approx(result.set_sigma)
    assert not out.with_suffix(".json").exists()   # a calib.json beside calib.jsonl may be the user's
    assert torch.equal(calibration_windows(biased_checkpoint, str(out), 8, 24), result.ids)
    assert torch.equal(calibration_windows(biased_checkpoint, str(out), 2, 16), result.ids[:2, :16])
    with pytest.raises(Moeq2ggufError, match="--calib-ctx 24"):
        calibration_windows(biased_checkpoint, str(out), 2, 512)

    monkeypatch.setenv("MOEQ2GGUF_CACHE", str(tmp_path / "cache"))
    first = calibration_windows(biased_checkpoint, "ebss", 2, 20)
    assert first.shape == (2, 20) and (first[:, 0] == tok.bos_token_id).all()
    assert len(list((tmp_path / "cache" / "ebss").glob("*.jsonl"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(ebss_mod, "generate_ebss", no_generation)
    assert torch.equal(calibration_windows(biased_checkpoint, "ebss", 2, 20), first)


def test_cli_calibrate(tmp_path, capsys, biased_checkpoint):
    out = tmp_path / "e.jsonl"
    code = cli.main(["calibrate", str(biased_checkpoint), "--ebss", "-o", str(out), "--n", "2", "--len", "24",
                     "--report", "calib", "--device", "cpu", "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.is_file() and len(out.read_text().splitlines()) == 2
    assert "wrote" in printed and "ngram" in printed
    lines = printed.splitlines()
    assert any(line.lstrip().startswith("all") for line in lines)
    assert any(line.lstrip().startswith("tok") and line.count("48") == 2 for line in lines)   # equal token counts


@pytest.mark.parametrize("argv, message", [
    (["--n", "2"], "nothing to do"),
    (["--ebss"], "needs -o"),
    (["--ebss", "-o", "x.txt"], "must end in .jsonl"),
    (["--ebss", "-o", "x.jsonl", "--tau", "-1"], "--tau -1.0 must be positive"),
])
def test_cli_calibrate_errors(tmp_path, capsys, biased_checkpoint, argv, message):
    capsys.readouterr()
    code = cli.main(["calibrate", str(biased_checkpoint), *[a.replace("x.", str(tmp_path / "x.")) for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.glob("x.*"))


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "deepseek_v2", "qwen3moe", "olmoe", "mixtral", "qwen2moe", "glm4moe", "minimax_m2", "qwen35moe", "llama4", "ernie4_5_moe"])
def test_convert_with_ebss_calibration(family, tmp_path, small_tokenizers, monkeypatch):
    """--calib ebss end to end for every family transformers has a class for (DeepSeekMoE-16B has none: the next
    test): EBSS counts the experts with the family's own rule; the file runs in llama-cpp-python."""
    import numpy as np

    from moeq2gguf import convert, runtime
    monkeypatch.setenv("MOEQ2GGUF_CACHE", str(tmp_path / "cache"))
    model = random_model(family, seed=1)
    ckpt = save_checkpoint(model, small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"], tmp_path / family)
    out = convert(ckpt, tmp_path / "q.gguf", type="Q4_K_M", method="moequant", calib="ebss", calib_windows=2,
                  calib_ctx=24, progress=False).output
    assert len(list((tmp_path / "cache" / "ebss").glob("*.jsonl"))) == 1   # the sequences EBSS wrote, cached
    with runtime.load(out) as llm:
        assert np.isfinite(runtime.logits(llm, list(range(5, 25)))).all()


def test_a_family_transformers_cannot_run_gets_a_clear_error(tmp_path):
    from moeq2gguf.calib.balance import load_model
    from testing import random_deepseek_moe
    ckpt = tmp_path / "dsmoe"
    random_deepseek_moe().save_pretrained(ckpt)
    with pytest.raises(Moeq2ggufError, match="transformers has no class for model_type 'deepseek'"):
        load_model(ckpt)
