"""--smooth aggregate / down (EAQuant's foldable smoothing): the smoothed F32 GGUF gives the unsmoothed model's
logits in stock llama.cpp for every family it applies to, alone and after --rotate; smoothed quantized files run
in stock llama.cpp; what cannot be folded exactly is refused."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.calib import corpus
from moeq2gguf.cli import main
from moeq2gguf.transforms import smoothing
from test_rotate import SHAPES, _checkpoint
from util import eval_tokens, llama_logits, relative_error

N_TOKENS = 64
# one shape per family (test_rotate.SHAPES); GPT-OSS's swiglu_oai is not linear in up: no --smooth down
FAMILIES = ("mixtral", "qwen2moe-h96", "qwen3moe", "olmoe", "deepseek", "deepseek2-v2-lite", "deepseek2-v3", "gpt-oss",
            "glm4moe-qknorm", "minimax-m2", "qwen35moe", "llama4", "ernie4_5_moe")
VARIANTS = ("aggregate", "down", "rotate+aggregate,down")
# the families added in session 8 run the combined variant only (it exercises both kinds and the rotation)
ONE_VARIANT = ("glm4moe-qknorm", "minimax-m2", "qwen35moe", "llama4", "ernie4_5_moe")
CASES = [(shape, v) for shape in FAMILIES for v in VARIANTS if not (shape == "gpt-oss" and "down" in v)
         and (shape not in ONE_VARIANT or v == "rotate+aggregate,down")]
CASES.append(("gpt-oss", "rotate+aggregate"))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    # a short calibration text: tokenizing the whole calib split takes longer than the conversion here
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(corpus.read_text("calib")[:20_000])
    return path


@pytest.fixture(scope="module")
def family_model(tmp_path_factory, small_tokenizers, eval_text):
    """shape -> (checkpoint, plain F32 GGUF, its llama.cpp logits, eval tokens), built once per shape."""
    cache = {}

    def get(shape: str):
        if shape not in cache:
            tmp = tmp_path_factory.mktemp(shape)
            path, _, tok = _checkpoint(shape, tmp, small_tokenizers)
            plain = convert(path, tmp / "plain.gguf", type="F32", progress=False).output
            tokens = eval_tokens(tok, eval_text, N_TOKENS)
            cache[shape] = path, plain, llama_logits(plain, tokens), tokens
        return cache[shape]
    return get


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def _convert(path, out, smooth: str, calib_file, **kwargs):
    rotate = smooth.startswith("rotate+")
    return convert(path, out, smooth=smooth.removeprefix("rotate+"), rotate=rotate, calib=str(calib_file),
                   calib_windows=2, calib_ctx=64, progress=False, **kwargs).output


@pytest.mark.parametrize("shape, variant", CASES)
def test_smoothed_f32_equals_unsmoothed(shape, variant, family_model, calib_file, tmp_path):
    path, plain, ref, tokens = family_model(shape)
    out = _convert(path, tmp_path / "s.gguf", variant, calib_file, type="F32")
    got = llama_logits(out, tokens)
    err = relative_error(got, ref)
    print(f"{shape} {variant}: smoothed F32 GGUF vs unsmoothed: max |diff| / max |ref| = {err:.2e}")
    assert err <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    fields = gguf.GGUFReader(out).fields
    kinds = variant.removeprefix("rotate+")
    assert fields[smoothing.KEY].contents() == kinds
    assert fields[smoothing.ALPHA_KEY].contents() == pytest.approx(0.6)
    # the weights did change where each kind acts, and only there
    a, b = _tensors(plain), _tensors(out)
    if variant.startswith("rotate+"):   # the reference for what smoothing changed is the rotated, unsmoothed file
        a = _tensors(convert(path, tmp_path / "r.gguf", type="F32", rotate=True, progress=False).output)
    ffn_norm = "post_attention_norm" if shape.startswith(("gpt-oss", "glm4moe", "qwen35moe")) else "ffn_norm"

    def named(*ends: str) -> list[str]:
        return [n for n in b if n.endswith(tuple(f"{e}.weight" for e in ends))]
    norms = named(ffn_norm)
    readers = named("ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_exps", "ffn_gate_shexp", "ffn_gate")
    ups = named("ffn_up_exps", "ffn_up_shexp", "ffn_up")
    downs = named("ffn_down_exps", "ffn_down_shexp", "ffn_down")
    assert norms and readers and ups and downs

    def changed(names: list[str], expected: bool) -> None:
        for n in names:
            if expected:
                assert np.abs(b[n] - a[n]).max() > 1e-3 * np.abs(a[n]).max(), n
            else:
                assert np.array_equal(a[n], b[n]), n
    changed(norms + readers, "aggregate" in kinds)
    changed(downs, "down" in kinds)
    changed(ups, True)
    changed([n for n in b if n not in norms + readers + ups + downs], False)

@pytest.mark.parametrize("shape, method, smooth", [("mixtral", "moequant", "aggregate,down"),
                                                   ("qwen2moe-h96", "rtn", "aggregate,down"),
                                                   ("deepseek2-v3", "gptq", "rotate+down"),
                                                   ("gpt-oss", "imatrix", "aggregate")])
def test_smoothed_quantized_runs_in_stock_llama_cpp(shape, method, smooth, family_model, calib_file, tmp_path):
    """Loads and runs in stock llama.cpp, close to the float model (random tiny models have no outliers for
    smoothing to move: Q4_K_M agreement alike with and without it; a wrong fold gives unrelated logits)."""
    path, _, ref, tokens = family_model(shape)
    out = _convert(path, tmp_path / "q.gguf", smooth, calib_file, type="Q4_K_M", method=method)
    fields = gguf.GGUFReader(out).fields
    assert fields[smoothing.KEY].contents() == smooth.removeprefix("rotate+")
    assert fields["moeq2gguf.method"].contents() == method
    got = llama_logits(out, tokens)
    assert np.isfinite(got).all()
    err, agree = relative_error(got, ref), float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{shape} Q4_K_M {method} --smooth {smooth}: relative error {err:.3f}, same argmax {agree:.2f}")
    assert err < 1.0 and agree >= 0.4


def test_scales():
    # two experts, three channels: max |x| and max |W| per channel
    absmax = torch.tensor([[4.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    wmax = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    s = smoothing.aggregate_scales([(absmax, wmax)], alpha=0.5)
    # raw s = sqrt(max|x|) / 1: channel 0 max(2, 1) = 2, channel 1 1, channel 2 no evidence -> 1
    geo = (2.0 * 1.0) ** 0.5
    torch.testing.assert_close(s, torch.tensor([2.0 / geo, 1.0 / geo, 1.0]))
    # the shared expert counts as one more expert
    s = smoothing.aggregate_scales([(absmax, wmax), (torch.tensor([[0.0, 16.0, 0.0]]), torch.ones(1, 3))], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0 / 8**0.5, 4.0 / 8**0.5, 1.0]))
    # per expert: an unrouted expert (all zero) keeps s = 1; extreme ratios are clamped
    s = smoothing.down_scales(torch.tensor([[1e-12, 1e12], [0.0, 0.0]]), torch.ones(2, 2), alpha=1.0)
    torch.testing.assert_close(s, torch.tensor([[1 / smoothing.CLAMP, smoothing.CLAMP], [1.0, 1.0]]))


def test_parse():
    assert smoothing.parse("down, aggregate") == (("aggregate", "down"), ())
    assert smoothing.parse("per-expert") == ((), ("per-expert",))
    assert smoothing.parse(None) == ((), ())
    with pytest.raises(Moeq2ggufError, match="'outlier' is unknown; give one of aggregate, down, per-expert"):
        smoothing.parse("aggregate,outlier")
    with pytest.raises(Moeq2ggufError, match="names a kind twice"):
        smoothing.parse("down,down")
    with pytest.raises(Moeq2ggufError, match="per-expert .* does not combine with aggregate"):
        smoothing.parse("aggregate,per-expert")


def test_errors(family_model, calib_file, tmp_path):
    path, *_ = family_model("gpt-oss")
    with pytest.raises(Moeq2ggufError, match="--smooth down needs an expert activation linear in up.*swiglu_oai"):
        _convert(path, tmp_path / "m.gguf", "aggregate,down", calib_file, type="F32")
    path, *_ = family_model("mixtral")
    with pytest.raises(Moeq2ggufError, match="unsmoothed model"):
        _convert(path, tmp_path / "m.gguf", "aggregate", calib_file, type="Q4_K_M", imatrix=str(tmp_path / "i.gguf"))
    with pytest.raises(Moeq2ggufError, match="does not combine with --expert-hadamard"):
        _convert(path, tmp_path / "m.gguf", "down", calib_file, type="F32", expert_hadamard=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_smooth_and_inspect(family_model, calib_file, tmp_path, capsys):
    path, *_ = family_model("mixtral")
    out = tmp_path / "s.gguf"
    assert main(["convert", str(path), "-o", str(out), "--type", "F32", "--rotate", "--smooth", "aggregate,down",
                 "--calib", str(calib_file), "--calib-windows", "2", "--calib-ctx", "64", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("residual stream rotated: hadamard")
    assert lines[4] == "smoothed: aggregate,down, alpha 0.60 (EAQuant, folded into the weights; float outputs unchanged)"
    assert main(["convert", str(path), "-o", str(tmp_path / "x.gguf"), "--smooth", "middle", "-q"]) != 0
    assert "'middle' is unknown" in capsys.readouterr().err
