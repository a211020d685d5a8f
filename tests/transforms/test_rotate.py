"""--rotate: the rotated F32 GGUF gives the unrotated model's logits in llama.cpp, for every family;
rotated quantized files (rtn, gptq) load and run in stock llama.cpp."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.calib import corpus
from moeq2gguf.cli import main
from moeq2gguf.models.registry import open_model
from testing import random_deepseek_moe, random_model, save_checkpoint, save_mxfp4_gpt_oss
from moeq2gguf.transforms.rotate import random_rotation, rotate_sources
from util import eval_tokens, llama_logits, relative_error, transformers_logits

Q = gguf.GGMLQuantizationType
N_TOKENS = 64

# family (testing.random_model's name, or "deepseek" for the DeepSeekMoE reference), overrides
SHAPES = {
    "mixtral": ("mixtral", dict()),
    "mixtral-gqa4-tied": ("mixtral", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                          num_local_experts=4, tie_word_embeddings=True)),
    "qwen2moe-h96": ("qwen2moe", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3)),  # H_12 x H_8
    # llama.cpp's qwen2moe graph requires `output`, which the unrotated tied file lacks (it does not load):
    # the rotated file, which has one, is compared with transformers only
    "qwen2moe-tied": ("qwen2moe", dict(tie_word_embeddings=True)),
    "qwen3moe": ("qwen3moe", dict()),
    "olmoe": ("olmoe", dict()),
    "olmoe-tied": ("olmoe", dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=6,
                                 tie_word_embeddings=True, num_experts=4, num_experts_per_tok=1)),
    "deepseek": ("deepseek", dict()),
    "deepseek2-v2-lite": ("deepseek_v2", dict()),
    "deepseek2-v2-qlora-tied": ("deepseek_v2", dict(q_lora_rank=24, num_hidden_layers=3, tie_word_embeddings=True,
                                                    num_experts_per_tok=3, routed_scaling_factor=1.5)),
    "deepseek2-v3": ("deepseek_v3", dict()),
    "gpt-oss": ("gpt_oss", dict()),
    # the FFN input norm is post_attention_norm; q/k/v biases; qk norms (after the projection: untouched)
    "glm4moe-qknorm": ("glm4moe", dict(use_qk_norm=True)),
    "minimax-m2": ("minimax_m2", dict()),
    "qwen35moe": ("qwen35moe", dict()),
    "llama4": ("llama4", dict()),
    "ernie4_5_moe": ("ernie4_5_moe", dict()),
    # n_embd 88 = 8 x 11 has no Hadamard matrix here: the random orthogonal rotation
    "gpt-oss-tied-orthogonal": ("gpt_oss", dict(num_hidden_layers=3, num_key_value_heads=1, sliding_window=8,
                                                num_local_experts=6, num_experts_per_tok=3, hidden_size=88,
                                                head_dim=24, tie_word_embeddings=True)),
}


def _model(family: str, overrides: dict):
    return random_deepseek_moe(**overrides) if family == "deepseek" else random_model(family, **overrides)


def _checkpoint(shape: str, tmp_path, small_tokenizers):
    family, overrides = SHAPES[shape]
    model = _model(family, overrides)
    tok = small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"]
    return save_checkpoint(model, tok, tmp_path / "ckpt"), model, tok


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rotated_f32_equals_unrotated(shape, tmp_path, small_tokenizers, eval_text):
    path, model, tok = _checkpoint(shape, tmp_path, small_tokenizers)
    plain = convert(path, tmp_path / "plain.gguf", type="F32", progress=False).output
    rotated = convert(path, tmp_path / "rotated.gguf", type="F32", rotate=True, rotate_seed=3, progress=False).output
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    got = llama_logits(rotated, tokens)
    refs = {"transformers": transformers_logits(model, tokens)}
    if shape != "qwen2moe-tied":
        refs["unrotated GGUF"] = llama_logits(plain, tokens)
    for label, ref in refs.items():
        err = relative_error(got, ref)
        print(f"{shape}: rotated F32 GGUF vs {label}: max |diff| / max |ref| = {err:.2e}")
        assert err <= 1e-4, label
        assert (got.argmax(-1) == ref.argmax(-1)).all(), label

    # the weights did change: norms feeding linears are ones, the embeddings rotated
    a, b = _tensors(plain), _tensors(rotated)
    fields = gguf.GGUFReader(rotated).fields
    kind = "orthogonal" if shape.endswith("orthogonal") else "hadamard"
    assert fields["moeq2gguf.rotation"].contents() == kind
    assert fields["moeq2gguf.rotation_seed"].contents() == 3
    assert np.abs(b["token_embd.weight"] - a["token_embd.weight"]).max() > 1e-2
    norms = [n for n in b if n.endswith(("attn_norm.weight", "ffn_norm.weight", "post_attention_norm.weight"))
             or n == "output_norm.weight"]
    n_layers = model.config["num_hidden_layers"] if isinstance(model.config, dict) else model.config.num_hidden_layers
    assert len(norms) == 2 * n_layers + 1
    assert all(np.array_equal(b[n], np.ones_like(b[n])) for n in norms)
    assert not any(np.array_equal(a[n], b[n]) for n in norms)
    # tied checkpoints get their own output head; everything else keeps its tensor set
    assert set(b) == set(a) | {"output.weight"}
    assert ("output.weight" in a) or "tied" in shape


def _mxfp4_checkpoint(tmp_path, tok):
    """A GPT-OSS checkpoint with its experts in HF's MXFP4 blocks/scales, and the float model
    holding exactly those values."""
    model = random_model("gpt_oss")
    save_mxfp4_gpt_oss(model, tok, tmp_path / "mxfp4")
    return tmp_path / "mxfp4", model


def test_rotated_mxfp4_experts_are_reencoded(tmp_path, small_tokenizers, eval_text):
    """Rotation changes the MXFP4 experts' values, so their blocks cannot be copied: the rotated
    sources drop raw_qtype, the F32 file holds them exactly (logits equal the float reference) and
    a quantized mix gives them its own types."""
    tok = small_tokenizers["qwen2moe"]
    path, model = _mxfp4_checkpoint(tmp_path, tok)
    adapter = open_model(path)
    sources = rotate_sources(adapter.all_tensors(), adapter.spec, random_rotation(adapter.spec.hidden_size))
    experts = [s for s in sources if s.name.endswith("_exps.weight")]
    assert experts and all(s.raw_qtype is None and s.load_raw is None for s in experts)

    out = convert(path, tmp_path / "rot-f32.gguf", type="F32", rotate=True, progress=False).output
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert all(types[s.name] == Q.F32 for s in experts)
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    ref, got = transformers_logits(model, tokens), llama_logits(out, tokens)
    assert relative_error(got, ref) <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    out = convert(path, tmp_path / "rot-q4.gguf", type="Q4_K_M", rotate=True, progress=False).output
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert all(types[s.name] != Q.MXFP4 for s in experts)
    assert np.isfinite(llama_logits(out, tokens)).all()


def _agreement(got: np.ndarray, ref: np.ndarray) -> float:
    return float((got.argmax(-1) == ref.argmax(-1)).mean())


@pytest.mark.parametrize("shape, method", [("mixtral", "rtn"), ("qwen2moe-h96", "rtn"), ("deepseek2-v3", "rtn"),
                                           ("gpt-oss", "rtn"), ("mixtral", "gptq"), ("qwen2moe-tied", "gptq"),
                                           ("qwen2moe-h96", "imatrix"), ("mixtral", "moequant")])
def test_rotated_quantized_runs_in_stock_llama_cpp(shape, method, tmp_path, small_tokenizers, eval_text):
    """Loads and runs, close to the float model. These random tiny models have no outlier channels
    for the rotation to spread: measured Q4_K_M agreement with and without rotation is alike (0.5 to 0.9);
    a wrong fold or rotation gives unrelated logits (same argmax ~1/512)."""
    path, _, tok = _checkpoint(shape, tmp_path, small_tokenizers)
    # the float reference: the rotated F32 file (equal to the unrotated model, test above)
    base = convert(path, tmp_path / "f32.gguf", type="F32", rotate=True, progress=False).output
    kwargs = {}
    if method != "rtn":   # a short calibration text: tokenizing the whole calib split takes longer than GPTQ here
        (tmp_path / "calib.txt").write_text(corpus.read_text("calib")[:20_000])
        kwargs = dict(calib=str(tmp_path / "calib.txt"), calib_windows=2, calib_ctx=64)
    out = convert(path, tmp_path / "q.gguf", type="Q4_K_M", method=method, rotate=True, progress=False, **kwargs).output
    fields = gguf.GGUFReader(out).fields
    assert fields["moeq2gguf.rotation"].contents() == "hadamard"
    assert fields["moeq2gguf.method"].contents() == method
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    ref, got = llama_logits(base, tokens), llama_logits(out, tokens)
    assert np.isfinite(got).all()
    err, agree = relative_error(got, ref), _agreement(got, ref)
    print(f"{shape} Q4_K_M {method} rotated: relative error {err:.3f}, same argmax {agree:.2f}")
    assert err < 1.0 and agree >= 0.4


def test_cli_rotate_and_inspect(tmp_path, small_tokenizers, capsys):
    path, _, _ = _checkpoint("mixtral", tmp_path, small_tokenizers)
    out = tmp_path / "r.gguf"
    assert main(["convert", str(path), "-o", str(out), "--type", "F32", "--rotate", "--rotate-seed", "5", "-q"]) == 0
    assert gguf.GGUFReader(out).fields["moeq2gguf.rotation_seed"].contents() == 5
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "residual stream rotated: hadamard, seed 5" in capsys.readouterr().out


def test_rotation_errors(tmp_path, small_tokenizers):
    path, _, _ = _checkpoint("mixtral", tmp_path, small_tokenizers)
    with pytest.raises(Moeq2ggufError, match="rotation seed 'x' is a str; give a non-negative integer"):
        convert(path, tmp_path / "m.gguf", type="F32", rotate=True, rotate_seed="x", progress=False)
    with pytest.raises(Moeq2ggufError, match="--rotate-seed has no effect without --rotate"):
        convert(path, tmp_path / "m.gguf", type="F32", rotate_seed=1, progress=False)
    with pytest.raises(Moeq2ggufError, match="unrotated model"):
        convert(path, tmp_path / "m.gguf", type="Q4_K_M", rotate=True, imatrix=str(tmp_path / "i.gguf"), progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_moequant_rotates_by_default(tmp_path, small_tokenizers):
    """--method moequant's default recipe includes the rotation (BENCHMARKS.md); --no-rotate / rotate=False turns
    it off, other methods stay unrotated unless asked, and an explicit seed is honoured."""
    path, _, _ = _checkpoint("mixtral", tmp_path, small_tokenizers)
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)

    def rotation_seed(*argv):
        out = tmp_path / "q.gguf"
        assert main(["convert", str(path), "-o", str(out), "--type", "Q4_K_M", "--calib", str(calib),
                     "--calib-windows", "2", "--calib-ctx", "64", "-q", *argv]) == 0
        field = gguf.GGUFReader(out).fields.get("moeq2gguf.rotation_seed")
        return None if field is None else field.contents()

    assert rotation_seed("--method", "moequant") == 0
    assert rotation_seed("--method", "moequant", "--rotate-seed", "4") == 4
    assert rotation_seed("--method", "moequant", "--no-rotate") is None
    assert rotation_seed("--method", "gptq") is None
    assert rotation_seed("--method", "gptq", "--rotate") == 0
    with pytest.raises(Moeq2ggufError, match="--rotate-seed has no effect without --rotate"):
        convert(path, tmp_path / "m.gguf", type="Q4_K_M", method="moequant", rotate=False, rotate_seed=1, progress=False)
