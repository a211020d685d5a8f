"""Per-expert smoothing and the expert Hadamard as transforms of the tensor sources: the matrices are
llama.cpp's, and the transformed model is the same function in float (torch only; the patched llama.cpp
runs them in tests/test_runtime_patched.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moeq2gguf import Moeq2ggufError, nn
from moeq2gguf.models.registry import open_model
from testing import random_model, save_checkpoint
from moeq2gguf.transforms import expert_hadamard, expert_smoothing
from moeq2gguf.transforms.expert_hadamard import apply_blocks, hadamard_block, hadamard_matrix
from patched_reference import patched_logits
from util import eval_tokens, relative_error, transformers_logits


def ggml_gen_hadamard(n: int) -> np.ndarray:
    """llama.cpp's src/llama-kv-cache.cpp construction, transcribed: H_2s = [[H, H], [H, -H]] in place."""
    data = np.zeros((n, n), dtype=np.float64)
    data[0, 0] = 1.0 / np.sqrt(n)
    s = 1
    while s < n:
        data[s:2 * s, :s] = data[:s, :s]
        data[:s, s:2 * s] = data[:s, :s]
        data[s:2 * s, s:2 * s] = -data[:s, :s]
        s *= 2
    return data


@pytest.mark.parametrize("n", [2, 8, 32, 128, 512])
def test_hadamard_matrix_is_llama_cpps(n):
    h = hadamard_matrix(n).numpy()
    np.testing.assert_allclose(h, ggml_gen_hadamard(n), rtol=0, atol=1e-15)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)    # symmetric and orthogonal: H H = I
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("n_ff, cap, block", [(96, None, 32), (128, None, 128), (1408, None, 128),
                                              (14336, None, 2048), (14336, 512, 512), (2880, None, 64),
                                              (4096, 1024, 1024)])
def test_block_is_largest_power_of_two_divisor(n_ff, cap, block):
    assert hadamard_block(n_ff, cap) == block


def test_default_block_is_capped_where_gpu_kernels_transform_in_place():
    # Mixtral's 14336 = 7 * 2048: 28 blocks of 512, not 7 dense blocks of 2048
    assert hadamard_block(14336) == 512
    assert hadamard_block(1408) == 128


def test_block_errors():
    with pytest.raises(Moeq2ggufError, match="odd"):
        hadamard_block(99)
    with pytest.raises(Moeq2ggufError, match="power of two"):
        hadamard_block(96, max_block=48)


def test_apply_blocks_is_block_diagonal_product():
    x = torch.randn(5, 3, 96, dtype=torch.float64)
    h = hadamard_matrix(32)
    full = torch.block_diag(h, h, h)
    torch.testing.assert_close(apply_blocks(x, 32), x @ full, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_blocks(apply_blocks(x, 32), 32), x, rtol=0, atol=1e-12)


def test_smoothing_scales():
    absmax = torch.tensor([[4.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    wmax = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    s = expert_smoothing.smoothing_scales(absmax, wmax, alpha=0.6)
    assert s[0, 0].item() == pytest.approx(4.0 ** 0.6 / 2.0 ** 0.4)
    # no evidence (unrouted expert, zero activations or weights): no smoothing
    assert s[0, 1] == 1 and s[0, 2] == 1 and (s[1] == 1).all()
    with pytest.raises(Moeq2ggufError, match="alpha"):
        expert_smoothing.smoothing_scales(absmax, wmax, alpha=1.5)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, small_tokenizers):
    """A random Mixtral whose expert width 96 takes 3 Hadamard blocks of 32."""
    model = random_model("mixtral", intermediate_size=96)
    path = save_checkpoint(model, small_tokenizers["mixtral"], tmp_path_factory.mktemp("mixtral") / "ckpt")
    return path, model


@pytest.mark.parametrize("smooth, hadamard", [(True, True), (True, False), (False, True)])
def test_transformed_model_is_the_same_function(mixtral, small_tokenizers, eval_text, smooth, hadamard):
    path, model = mixtral
    adapter = open_model(path)
    spec, sources = adapter.spec, adapter.all_tensors()
    tokens = eval_tokens(small_tokenizers["mixtral"], eval_text, 64)
    transformed, block = sources, 0
    if smooth:
        windows = torch.tensor(eval_tokens(small_tokenizers["mixtral"], eval_text, 128, offset=5000)).view(2, 64)
        stats = expert_smoothing.expert_input_absmax(sources, spec, windows)
        assert set(stats) == set(range(spec.n_layers)) and all((st.count > 0).all() for st in stats.values())
        transformed = expert_smoothing.smooth_sources(transformed, spec, stats)
    if hadamard:
        block = hadamard_block(spec.expert_width)
        transformed = expert_hadamard.expert_hadamard_sources(transformed, spec, block)
    t = {s.name: s.load().reshape(s.shape).float() for s in transformed}
    plain = {s.name: s.load().reshape(s.shape).float() for s in sources}

    names = [s.name for s in transformed]
    extra = {f"blk.{b}.ffn_exps_smooth" for b in range(spec.n_layers)} if smooth else set()
    extra |= {"ffn_exps_hadamard"} if hadamard else set()
    assert set(names) == set(plain) | extra
    if smooth:   # inside its layer, after the layer's expert readers (the engine streams layer by layer)
        i = names.index("blk.0.ffn_exps_smooth")
        assert names[i - 1] == "blk.0.ffn_up_exps.weight" and transformed[i].layer == 0
        r = t["blk.0.ffn_exps_smooth"]
        assert r.shape == (spec.n_experts, spec.hidden_size) and r.max() / r.min() > 2   # it does smooth
        torch.testing.assert_close(t["blk.0.ffn_up_exps.weight"] * r[:, None, :], plain["blk.0.ffn_up_exps.weight"])
    if hadamard:
        assert names[-1] == "ffn_exps_hadamard"
        torch.testing.assert_close(t["ffn_exps_hadamard"], hadamard_matrix(block).float())
        assert (t["blk.1.ffn_down_exps.weight"] - plain["blk.1.ffn_down_exps.weight"]).abs().max() > 1e-2

    ref = transformers_logits(model, tokens)
    base = patched_logits(plain, spec, tokens, 0)
    got = patched_logits(t, spec, tokens, block)
    assert relative_error(base, ref) < 1e-5      # the reference forward is Mixtral's
    assert relative_error(got, base) < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # without the runtime's part of the transform the model is a different function
    if hadamard:
        assert relative_error(patched_logits(t, spec, tokens, 0), base) > 1e-2
    # the calibration forward (nn) applies both as the patched runtime does: its layer outputs are the float model's
    nn_spec = dataclasses.replace(spec, expert_hadamard_block=block)
    x = torch.tensor([tokens])
    h_plain, h_tf = nn.embed(x, plain["token_embd.weight"]), nn.embed(x, t["token_embd.weight"])
    with torch.no_grad():
        for bid in range(spec.n_layers):
            layer = {k.split(".", 2)[2]: v for k, v in plain.items() if k.startswith(f"blk.{bid}.")}
            layer_tf = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"blk.{bid}.")}
            h_plain = nn.decoder_layer(h_plain, layer, spec, bid=bid)[0]
            h_tf = nn.decoder_layer(h_tf, layer_tf, nn_spec, bid=bid)[0]
            assert relative_error(h_tf.numpy(), h_plain.numpy()) < 1e-5, bid


def test_sensitivity_of_the_transformed_model(mixtral, small_tokenizers, eval_text):
    """The size allocator measures the file's model: the float pass runs the expert Hadamard, and per-expert
    smoothing transforms each block in the pass (its weights and the statistics of the expert input, pooled sums
    included). The losses equal those of a second pass over the smoothed sources, and differ from the plain model's:
    exactly for RTN (the weights and the loss's input statistics), closely for moequant (GPTQ's rounding choices
    follow float rounding of its Hessians, which the two passes accumulate in different orders)."""
    from moeq2gguf import methods
    from moeq2gguf.passes.calibration import float_pass
    from moeq2gguf.passes.layers import Layers
    from moeq2gguf.passes.quantize import QuantConfig
    from moeq2gguf.plan.alloc import candidate_types
    from moeq2gguf.quant.sensitivity import Sensitivity
    from moeq2gguf.transforms import patched
    path, _ = mixtral
    adapter = open_model(path)
    spec, sources = adapter.spec, adapter.all_tensors()
    windows = torch.tensor(eval_tokens(small_tokenizers["mixtral"], eval_text, 128, offset=5000)).view(2, 64)
    candidates = {s.name: candidate_types(s.shape)[:3] for s in sources if "_exps." in s.name}
    model = patched.prepare(sources, spec, patched.ExpertTransforms(smooth="per-expert", hadamard=True),
                            transform_blocks=True)

    def measure(method, layer_sources, spec, *plugins):
        sens = Sensitivity(spec, candidates, methods.get(method), QuantConfig(method=method).gptq, tied=False)
        float_pass(Layers.of(layer_sources, spec.n_layers), spec, windows, [*plugins, sens], "test")
        return [(n, q, loss) for n, losses in sorted(sens.losses.items()) for q, loss in losses.items()]

    def deviation(a, b):   # the mean relative difference of two measurements
        assert [x[:2] for x in a] == [x[:2] for x in b]
        return sum(abs(x[2] / y[2] - 1) for x, y in zip(a, b)) / len(a)

    for method, same in (("rtn", 1e-5), ("moequant", 0.02)):
        in_pass = measure(method, model.pass_sources, model.spec, model.maxima)
        direct = measure(method, model.sources, model.spec)
        plain = measure(method, sources, spec)
        print(f"{method}: mean relative difference to the smoothed sources' pass {deviation(in_pass, direct):.2e}, "
              f"to the plain model's {deviation(in_pass, plain):.2e}")
        assert deviation(in_pass, direct) < same
        assert deviation(in_pass, plain) > 0.05
        for kind in ("ffn_gate_exps", "ffn_down_exps"):   # each transform moves its tensors' losses
            assert deviation(*([x for x in m if kind in x[0]] for m in (in_pass, plain))) > 0.02, kind
    adapter.reader.close()
