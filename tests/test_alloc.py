"""Bit allocation under a memory budget: the knapsack solver, budgets, and convert --target-size end to end."""
from __future__ import annotations

import itertools
import json
import random

import gguf
import numpy as np
import pytest

from moeq2gguf import convert, runtime
from moeq2gguf.plan import alloc
from moeq2gguf.cli import main
from moeq2gguf.errors import Moeq2ggufError
from testing import random_model, save_checkpoint

Q = gguf.GGMLQuantizationType


def _total(values, pick):
    return sum(v[k] for v, k in zip(values, pick))


def test_solver_hand_computed():
    # Greedy by loss saved per byte takes A (2.1/byte) first and then nothing else fits (loss 11.5);
    # the optimum is B + C, exactly the budget (loss 10.5).
    costs = [[0, 5], [0, 3], [0, 3]]
    losses = [[10.5, 0.0], [6.0, 0.0], [5.5, 0.0]]
    assert alloc.solve(costs, losses, 6) == [0, 1, 1]
    # Two items with several options, budget 5: the six combinations by hand give
    # (X 1, Y 1) 16, (X 2, Y 1) 11, (X 4, Y 1) 8, (X 1, Y 3) 11, (X 2, Y 3) 6, (X 4, Y 3) over budget.
    assert alloc.solve([[1, 2, 4], [1, 3]], [[9, 4, 1], [7, 2]], 5) == [1, 1]
    with pytest.raises(ValueError):
        alloc.solve([[1, 2, 4], [1, 3]], [[9, 4, 1], [7, 2]], 1)


def test_solver_matches_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 5)
        costs = [[rng.randint(0, 40) * 8 for _ in range(rng.randint(1, 4))] for _ in range(n)]
        losses = [[rng.random() for _ in c] for c in costs]
        budget = rng.randint(0, 400)
        feasible = [p for p in itertools.product(*(range(len(c)) for c in costs)) if _total(costs, p) <= budget]
        if not feasible:
            with pytest.raises(ValueError):
                alloc.solve(costs, losses, budget)
            continue
        best = min(_total(losses, p) for p in feasible)
        pick = alloc.solve(costs, losses, budget)
        assert _total(costs, pick) <= budget
        assert _total(losses, pick) == pytest.approx(best, abs=1e-12), trial
        # coarse units (costs rounded up): still within the budget, never better than the optimum
        coarse = alloc.solve(costs, losses, budget, resolution=3)
        assert _total(costs, coarse) <= budget and _total(losses, coarse) >= best - 1e-12


def test_parse_size_and_candidates():
    assert alloc.parse_size("6GiB") == 6 * 2**30
    assert alloc.parse_size("1.5 GB") == 1_500_000_000
    assert alloc.parse_size("500MiB") == 500 * 2**20
    assert alloc.parse_size("123456") == 123456
    for bad in ("6 gigs", "-3GB", "GB", "0"):
        with pytest.raises(Moeq2ggufError):
            alloc.parse_size(bad)
    assert alloc.candidate_types((8, 512)) == list(alloc.CANDIDATES)
    # rows of 128: llama-quantize's fallbacks, deduplicated, smallest first
    assert alloc.candidate_types((16, 256, 128)) == [Q.Q4_0, Q.IQ4_NL, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16]
    assert alloc.candidate_types((4, 48)) == [Q.F16]
    # under a low budget the i-quants join, by size; without an importance vector only those ggml can round so
    assert alloc.candidate_types((8, 512), lattice=True) == [
        Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.Q2_K, Q.IQ3_XXS, Q.Q3_K, Q.IQ3_S, Q.IQ4_XS, Q.Q4_K, Q.Q5_K,
        Q.Q6_K, Q.Q8_0, Q.F16]
    assert alloc.candidate_types((8, 512), lattice=True, needs_no_importance=True)[:4] == [Q.IQ1_M, Q.IQ2_S, Q.Q2_K, Q.IQ3_XXS]
    assert alloc.candidate_types((16, 256, 128), lattice=True) == [Q.IQ4_NL, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16]
    assert alloc.tensor_class("blk.3.ffn_down_exps.weight") == "ffn_down"
    assert alloc.tensor_class("blk.3.ffn_up_shexp.weight") == "shexp_gate_up"
    assert alloc.tensor_class("blk.0.attn_k.weight") == "attn_qkv"
    assert alloc.tensor_class("token_embd.weight", tied=True) == "output"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizers):
    model = random_model("mixtral", hidden_size=256, intermediate_size=256, num_local_experts=4, num_hidden_layers=2,
                         init_std=0.05)
    return save_checkpoint(model, small_tokenizers["mixtral"], tmp_path_factory.mktemp("alloc") / "ckpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEQ2GGUF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, eval_text):
    """A few windows' worth of text: tokenizing a whole corpus split would dominate these tests."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(eval_text[:20_000])
    return str(path)


KW = dict(method="rtn", calib_windows=2, calib_ctx=64, progress=False)


@pytest.fixture(scope="module")
def sizes(checkpoint):
    """Tensor data bytes of the model at the Q2_K and Q8_0 mixes (the metadata adds a few KiB to a file)."""
    from moeq2gguf.plan.mixes import assign_types
    from moeq2gguf.models.registry import open_model
    adapter = open_model(checkpoint)
    sources, spec = adapter.all_tensors(), adapter.spec
    adapter.reader.close()
    out = {}
    for mix in ("Q2_K", "Q8_0"):
        types = assign_types([(s.name, s.shape) for s in sources], mix, n_layer=spec.n_layers, n_expert=spec.n_experts,
                             n_head=spec.n_heads, n_head_kv=spec.n_kv_heads)
        out[mix] = sum(alloc.tensor_nbytes(s.shape, t) for s, t in zip(sources, types))
    return out


def _types(path):
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_target_size_fits_records_recipe_and_loads(checkpoint, sizes, tmp_path, cache, calib_file):
    budget = (sizes["Q2_K"] + sizes["Q8_0"]) // 2
    out = tmp_path / "a.gguf"
    result = convert(checkpoint, out, target_size=budget, calib=calib_file, **KW)
    size = out.stat().st_size
    assert 0.9 * budget <= size <= budget
    assert size == result.allocation.total
    reader = gguf.GGUFReader(out)
    recipe = json.loads(reader.get_field(alloc.RECIPE_KEY).contents())
    assert reader.get_field(alloc.TARGET_SIZE_KEY).contents() == budget
    types = _types(out)
    assert {n: Q[t] for n, (t, _) in recipe["tensors"].items()} == {n: q for n, q in types.items() if n in recipe["tensors"]}
    assert len(set(types[n] for n in recipe["tensors"])) > 1, "a mid budget mixes types"
    assert recipe["predicted_kld"] > 0
    with runtime.load(out, n_ctx=64) as llm:
        assert np.isfinite(runtime.logits(llm, [1, 2, 3, 4])).all()


def test_overrides_win_and_budget_still_holds(checkpoint, sizes, tmp_path, cache, calib_file):
    budget = (sizes["Q2_K"] * 3 + sizes["Q8_0"]) // 4
    out = tmp_path / "o.gguf"
    convert(checkpoint, out, target_size=budget, tensor_types=("ffn_down_exps=Q8_0", "attn_q=Q2_K"), calib=calib_file, **KW)
    types = _types(out)
    assert all(types[f"blk.{i}.ffn_down_exps.weight"] == Q.Q8_0 for i in range(2))
    assert all(types[f"blk.{i}.attn_q.weight"] == Q.Q2_K for i in range(2))
    assert out.stat().st_size <= budget


def test_too_small_names_the_smallest_size_which_then_works(checkpoint, tmp_path, cache, calib_file):
    with pytest.raises(Moeq2ggufError, match=r"smallest this model can be written as: ([\d,]+) bytes") as err:
        convert(checkpoint, tmp_path / "x.gguf", target_size="100KB", calib=calib_file, **KW)
    assert "bpw" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()
    smallest = int(err.value.args[0].split("written as: ")[1].split(" bytes")[0].replace(",", ""))
    out = tmp_path / "s.gguf"
    convert(checkpoint, out, target_size=smallest, calib=calib_file, **KW)
    assert out.stat().st_size <= smallest


def test_target_bpw_as_llama_cpp_counts_it(checkpoint, tmp_path, cache, calib_file):
    out = tmp_path / "b.gguf"
    convert(checkpoint, out, target_bpw=4.0, calib=calib_file, **KW)
    reader = gguf.GGUFReader(out)
    bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
    assert 3.6 <= bpw <= 4.0
    assert reader.get_field(alloc.TARGET_BPW_KEY).contents() == pytest.approx(4.0)


def test_target_size_of_a_mix_is_that_mixs_tensor_bytes(checkpoint, tmp_path, cache, calib_file):
    """--target-size Q3_K_M: the tensor data of the file the fixed Q3_K_M mix gives (llama.cpp's, type for type) is the
    budget; the allocated file's tensor data fits it, and names it."""
    fixed, allocated = tmp_path / "fixed.gguf", tmp_path / "alloc.gguf"
    convert(checkpoint, fixed, type="Q3_K_M", **KW)
    convert(checkpoint, allocated, target_size="q3_k_m", calib=calib_file, **KW)
    tensor_bytes = {p: sum(int(t.n_bytes) for t in gguf.GGUFReader(p).tensors) for p in (fixed, allocated)}
    reader = gguf.GGUFReader(allocated)
    assert reader.get_field(alloc.TARGET_SIZE_KEY).contents() == tensor_bytes[fixed]
    assert 0.97 * tensor_bytes[fixed] <= tensor_bytes[allocated] <= tensor_bytes[fixed]
    recipe = json.loads(reader.get_field(alloc.RECIPE_KEY).contents())
    assert recipe["budget"] == tensor_bytes[fixed] and recipe["budget_kind"] == "bpw"


def test_low_budget_uses_the_i_quants(checkpoint, tmp_path, cache, calib_file):
    """Below 4 bits per weight the i-quants are candidates: at 2.6 bpw the allocator picks some, the file stays within
    the budget and runs."""
    from moeq2gguf.formats.lattice import LATTICE_TYPES
    out = tmp_path / "iq.gguf"
    convert(checkpoint, out, target_bpw=2.6, calib=calib_file, **{**KW, "method": "imatrix"})
    reader = gguf.GGUFReader(out)
    bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
    assert 2.3 <= bpw <= 2.6
    assert {Q(t.tensor_type) for t in reader.tensors} & LATTICE_TYPES
    with runtime.load(out, n_ctx=64) as llm:
        assert np.isfinite(runtime.logits(llm, [1, 2, 3, 4])).all()


def test_cli_prints_recipe_and_refuses_type_with_target(checkpoint, sizes, tmp_path, cache, capsys, calib_file):
    budget = (sizes["Q2_K"] + sizes["Q8_0"]) // 2
    args = ["convert", str(checkpoint), "-o", str(tmp_path / "c.gguf"), "--target-size", str(budget), "--calib", calib_file,
            "--calib-windows", "2", "--calib-ctx", "64", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "recipe for" in out and "ffn_down_exps" in out and "predicted KLD" in out
    assert main([*args, "--type", "Q4_K_M"]) == 2
    assert "drop --type" in capsys.readouterr().err


def test_weighted_error_kernel():
    """sum_g weight_g tr(D_g H_g D_g^T): a zero-weight group adds nothing, whatever its error."""
    import torch
    from moeq2gguf.quant.sensitivity import weighted_error
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 8, generator=gen)
    q = w + torch.randn(2, 3, 8, generator=gen) * torch.tensor([0.01, 100.0])[:, None, None]
    x = torch.randn(2, 50, 8, generator=gen)
    H = x.transpose(1, 2) @ x / 50
    direct = ((w[0] - q[0]) @ x[0].T).pow(2).sum() / 50
    assert weighted_error(w, q, H, torch.tensor([0.5, 0.0])) == pytest.approx(0.5 * float(direct), rel=1e-5)


def test_sensitivity_counts_an_expert_by_router_use(tmp_path, small_tokenizers, cache, calib_file):
    """moequant: each expert's error counts by its affinity mass. Expert 3 with huge weights dominates the
    loss of its tensor while the router uses it, and adds nothing once the router never picks it; losses
    fall with every step up in bits."""
    import torch
    from moeq2gguf import nn
    from moeq2gguf.models.registry import open_model
    from moeq2gguf.passes.quantize import QuantConfig
    from moeq2gguf.quant.sensitivity import measure
    model = random_model("qwen2moe", hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, init_std=0.05)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3 and p.shape[0] == 4:   # fused expert stacks [E, out, in]: blow up expert 3
                p[3] *= 100
    ckpt = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "ckpt")
    adapter = open_model(ckpt)
    sources = adapter.all_tensors()
    name = "blk.0.ffn_down_exps.weight"
    types = [Q.Q2_K, Q.Q4_K, Q.Q8_0, Q.F16]
    cfg = QuantConfig(method="moequant", calib=calib_file, n_windows=2, ctx=64)
    used = measure(adapter, sources, {name: types}, cfg, progress=False)[name]
    real = nn.router_logits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn, "router_logits", lambda x, w: real(x, w).index_fill(1, torch.tensor([3]), float("-inf")))
        unused = measure(adapter, sources, {name: types}, cfg, progress=False)[name]
    adapter.reader.close()
    values = [used[q.name] for q in types]
    assert all(a > b for a, b in zip(values, values[1:])), used
    assert unused["Q4_K"] > 0 and used["Q4_K"] > 100 * unused["Q4_K"]


def test_a_layer_too_big_to_measure_is_warned_of(monkeypatch, caplog):
    """The sensitivity keeps every expert's statistics of a layer at once: where that is estimated not to fit the
    device's free memory, a warning says so before the layer is measured (once per conversion)."""
    import torch
    from moeq2gguf.passes import expert_groups
    from moeq2gguf.quant import sensitivity
    weights = {"ffn_up_exps.weight": torch.zeros(8, 64, 256), "attn_q.weight": torch.zeros(256, 256)}
    monkeypatch.setattr(expert_groups, "free_bytes", lambda device: 2**40)
    assert not sensitivity.warn_if_too_big(3, weights, 8, torch.device("cpu"))
    monkeypatch.setattr(expert_groups, "free_bytes", lambda device: 2**20)
    with caplog.at_level("WARNING"):
        assert sensitivity.warn_if_too_big(3, weights, 8, torch.device("cpu"))
    assert "measures all 8 experts of layer 3 at once" in caplog.text and "--type MIX" in caplog.text
