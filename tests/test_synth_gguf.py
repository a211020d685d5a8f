"""tools/synth_moe_gguf.py: random-weight files at another model's shape, from a converted file as the template, that
llama.cpp loads and runs (the GPU speed check times them: tools/check_cuda_fusion.py check --synth)."""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert, runtime
from testing import random_model, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import synth_moe_gguf  # noqa: E402

# another shape than the template's (hidden 64, 8 experts of width 32, 2 used): every K-quant row length
# a multiple of 256, so that the Q4_K_M mix keeps its K-quants, as at a real model's shape
SHAPE = synth_moe_gguf.Shape(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_ff_exp=256,
                             n_ff_shexp=512, n_expert=8, n_expert_used=2, n_layer=3)


@pytest.fixture(scope="module")
def templates(tmp_path_factory, small_tokenizers):
    """A Qwen2-MoE checkpoint converted plain, with --smooth per-expert --expert-hadamard, and with --smooth
    per-expert alone (F32: only the metadata and the tensor names count)."""
    tmp = tmp_path_factory.mktemp("synth")
    ckpt = save_checkpoint(random_model("qwen2moe"), small_tokenizers["qwen2moe"], tmp / "ckpt")
    plain = convert(ckpt, tmp / "plain.gguf", type="F32", progress=False).output
    smooth = convert(ckpt, tmp / "smooth.gguf", type="F32", smooth="per-expert", expert_hadamard=True,
                     progress=False, calib_windows=4, calib_ctx=64).output
    smooth_only = convert(ckpt, tmp / "smooth-only.gguf", type="F32", smooth="per-expert",
                          progress=False, calib_windows=4, calib_ctx=64).output
    return tmp, plain, smooth, smooth_only


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_synthetic_files_have_the_shape_and_run(templates):
    tmp, plain_t, smooth_t, _ = templates
    plain = tmp / "synth-plain.gguf"
    smooth = tmp / "synth-smooth.gguf"
    info = synth_moe_gguf.synth(plain_t, plain, SHAPE)
    synth_moe_gguf.synth(smooth_t, smooth, SHAPE)
    assert not plain.with_name(plain.name + ".part").exists()
    assert "Q4_K" in info["types"] and "Q6_K" in info["types"]

    fields = {k: f.contents() for k, f in gguf.GGUFReader(smooth).fields.items()}
    assert fields["qwen2moe.embedding_length"] == 256 and fields["qwen2moe.block_count"] == 3
    assert fields["qwen2moe.expert_count"] == 8 and fields["qwen2moe.expert_feed_forward_length"] == 256
    assert fields["qwen2moe.expert_smoothing"] is True and fields["qwen2moe.expert_hadamard_block"] == 256
    a, b = _tensors(plain), _tensors(smooth)
    assert set(b) - set(a) == {"ffn_exps_hadamard", *(f"blk.{i}.ffn_exps_smooth" for i in range(3))}
    assert tuple(b["blk.2.ffn_down_exps.weight"].shape) == (256, 256, 8)
    assert b["blk.2.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    # same seed, same name: the same data in both files, so that they differ by the features only; the expert
    # inputs' weights carry the smoothing factors s_e (powers of two) in their scales
    for name in a:
        if name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            continue
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    for i in range(3):
        s_e = 1 / np.asarray(b[f"blk.{i}.ffn_exps_smooth"].data)                      # [n_expert, n_embd]
        assert set(np.unique(s_e)) == {1.0, 2.0}
        for role in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
            w_plain, w_smooth = (gguf.quants.dequantize(np.asarray(t[f"blk.{i}.{role}"].data), t[f"blk.{i}.{role}"].tensor_type)
                                 for t in (a, b))
            np.testing.assert_array_equal(w_smooth, w_plain * s_e[:, None, :])
    h = np.asarray(b["ffn_exps_hadamard"].data)
    assert np.allclose(h @ h.T, np.eye(256), atol=1e-5)

    tokens = list(range(10, 42))
    for path in (plain, smooth):
        logits = runtime.run_logits(path, tokens, patched=True)
        assert logits.shape[0] == len(tokens) and np.isfinite(logits).all() and logits.std() > 0
    with pytest.raises(Moeq2ggufError, match="wrong number of tensors"):
        runtime.run_logits(smooth, tokens)


def test_smoothing_of_a_synthetic_file_keeps_its_logits(templates):
    """Exact smoothing (powers of two, carried by the weights' block scales): the smoothed file computes the plain
    file's logits bit for bit, so on a GPU both route every token to the same experts and their speed compares."""
    tmp, plain_t, _, smooth_only_t = templates
    plain = synth_moe_gguf.synth(plain_t, tmp / "exact-plain.gguf", SHAPE)["file"]
    smooth = synth_moe_gguf.synth(smooth_only_t, tmp / "exact-smooth.gguf", SHAPE)["file"]
    assert "blk.0.ffn_exps_smooth" in _tensors(Path(smooth))
    tokens = list(range(10, 42))
    np.testing.assert_array_equal(runtime.run_logits(Path(smooth), tokens, patched=True),
                                  runtime.run_logits(Path(plain), tokens, patched=True))


def test_exact_smoothing_refuses_a_type_it_cannot_scale():
    with pytest.raises(SystemExit, match="TQ1_0"):
        synth_moe_gguf.scale_expert_columns(np.zeros((2, 54), np.uint8), gguf.GGMLQuantizationType.TQ1_0,
                                            np.ones((1, 256), np.float32))


def test_a_skeleton_template_gives_the_same_file(templates):
    """The GPU check carries skeletons (metadata and names, no weights) where whole files would not fit."""
    tmp, _, smooth_t, _ = templates
    skel = synth_moe_gguf.skeleton(smooth_t, tmp / "skeleton.gguf")
    assert skel.stat().st_size < smooth_t.stat().st_size / 4
    from_file = synth_moe_gguf.synth(smooth_t, tmp / "from-file.gguf", SHAPE)
    from_skeleton = synth_moe_gguf.synth(skel, tmp / "from-skeleton.gguf", SHAPE)
    assert Path(from_file["file"]).read_bytes() == Path(from_skeleton["file"]).read_bytes()


def test_a_tensor_without_a_shape_rule_is_named():
    with pytest.raises(SystemExit, match="blk.0.ffn_mystery.weight"):
        synth_moe_gguf.tensor_shape("blk.0.ffn_mystery.weight", SHAPE, 512)
