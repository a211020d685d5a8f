"""The method registry and the one calibration pass: a new method is one file (this one registers a toy method
and converts with it), nothing outside moeq2gguf/methods/ dispatches on a method's name, and a conversion with
smoothing and a size target runs the float calibration forward once per layer, reading the text once."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest
import torch

from moeq2gguf import cli, convert, methods
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.methods import Method, round_to_nearest
from moeq2gguf.passes import calibration, layers
from testing import random_model, save_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "moeq2gguf"


class ColumnMaxMethod(Method):
    """A toy method: ggml's importance-weighted quantizer with importance max |x| per column (not mean x^2)."""
    name = "toy-colmax"
    summary = "test method"
    calibrated = True
    full_statistics = False

    def quantize(self, w, qtype, stats, input_name, gptq):
        s = stats.inputs[input_name]
        importance = (s.plain_sq / s.count.clamp_min(1)[:, None]).sqrt().to(torch.float32) + 1e-6
        q = round_to_nearest(w, qtype, importance, method=self.name)
        return q


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizers):
    model = random_model("qwen2moe", num_hidden_layers=2, hidden_size=256, moe_intermediate_size=256,
                         shared_expert_intermediate_size=256, num_experts=4, num_experts_per_tok=2)
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path_factory.mktemp("ckpt"))


def test_a_method_is_one_file(checkpoint, tmp_path, capsys):
    methods.register(ColumnMaxMethod())
    assert "toy-colmax" in methods.names()
    out = tmp_path / "toy.gguf"
    assert cli.main(["convert", str(checkpoint), "-o", str(out), "--type", "Q4_K_M", "--method", "toy-colmax",
                     "--calib-windows", "2", "--calib-ctx", "64", "-q"]) == 0, capsys.readouterr().err
    fields = gguf.GGUFReader(out).fields
    assert bytes(fields["moeq2gguf.method"].parts[-1]).decode() == "toy-colmax"
    rtn = convert(checkpoint, tmp_path / "rtn.gguf", type="Q4_K_M", progress=False).output
    differs = [a.name for a, b in zip(gguf.GGUFReader(out).tensors, gguf.GGUFReader(rtn).tensors)
               if a.name.endswith("exps.weight") and bytes(a.data) != bytes(b.data)]
    assert differs, "the toy method's importance changed no expert tensor"


def test_unknown_method_lists_the_registry():
    with pytest.raises(Moeq2ggufError, match="--method nope is unknown; choose one of rtn, imatrix, gptq, moequant"):
        methods.get("nope")


def test_no_dispatch_on_method_names_outside_the_registry():
    pattern = re.compile(r"\bmethod\s*(==|!=)|\bmethod\s+(not\s+)?in\s")
    hits = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
            for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and "topk_method" not in line]
    assert hits == []


def test_smoothing_and_size_target_share_one_float_pass(checkpoint, tmp_path, monkeypatch):
    counts = {"float_pass": 0, "blocks": 0, "windows": 0}
    real_pass, real_block = calibration.float_pass, calibration.run_block
    from moeq2gguf.calib import sources
    real_windows = sources.calibration_windows

    def counting_pass(*args, **kwargs):
        counts["float_pass"] += 1
        return real_pass(*args, **kwargs)

    def counting_block(*args, **kwargs):
        counts["blocks"] += 1
        return real_block(*args, **kwargs)

    def counting_windows(*args, **kwargs):
        counts["windows"] += 1
        return real_windows(*args, **kwargs)

    import moeq2gguf.commands.convert as convert_module
    monkeypatch.setattr(convert_module, "float_pass", counting_pass)
    monkeypatch.setattr(calibration, "run_block", counting_block)
    monkeypatch.setattr(sources, "calibration_windows", counting_windows)
    monkeypatch.setenv("MOEQ2GGUF_CACHE", str(tmp_path / "cache"))   # measure, do not reuse
    result = convert(checkpoint, tmp_path / "m.gguf", method="moequant", smooth="aggregate", target_bpw=5.0,
                     calib_windows=2, calib_ctx=64, progress=False)
    assert result.allocation is not None
    assert counts == {"float_pass": 1, "blocks": 2, "windows": 1}   # 2 layers: one float forward each


def test_the_layer_loop_is_written_once():
    """Only passes/layers.py groups tensors by block and runs nn.decoder_layer over windows; the rest call it."""
    loops = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if "for chunk in x.split(" in p.read_text() and "nn.decoder_layer(chunk" in p.read_text()]
    assert loops == ["passes/layers.py"]
    assert layers.run_block is calibration.run_block
