"""Bad input: a one-line error that names the problem, exit code != 0, no output left behind."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from moeq2gguf import cli, plan
from testing import random_model, save_checkpoint


@pytest.fixture()
def checkpoint(tmp_path, small_tokenizers):
    return save_checkpoint(random_model("qwen2moe"), small_tokenizers["qwen2moe"], tmp_path / "ckpt")


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out_dir, expected):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moeq2gguf: error: ")
    assert expected in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "output folder must stay empty"


def test_wrong_directory(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(tmp_path / "nope"), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "is not a directory")


def test_directory_without_config(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["convert", str(tmp_path / "empty"), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "has no config.json")


def test_unsupported_architecture_lists_supported(checkpoint, tmp_path, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "architecture LlamaForCausalLM is not supported; supported: ")
    assert "MixtralForCausalLM" in err and "Qwen2MoeForCausalLM" in err


def test_truncated_safetensors(checkpoint, tmp_path, capsys):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "model.safetensors is truncated")


def test_missing_tokenizer(checkpoint, tmp_path, capsys):
    (checkpoint / "tokenizer.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "has no tokenizer.json")


def test_missing_expert_tensor(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    weights = checkpoint / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "-q"], capsys)
    assert_clean_failure(code, err, out, "model.layers.1.mlp.experts.5.up_proj.weight is missing")


def test_unknown_type(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "--type", "Q9_X", "-q"], capsys)
    assert_clean_failure(code, err, out, "--type Q9_X is unknown; choose one of F32, F16, BF16")


def test_failure_mid_stream_leaves_nothing_and_input_untouched(checkpoint, tmp_path, monkeypatch):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    calls = {"n": 0}
    real = plan.encode_float

    def failing(tensor, qtype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk full (simulated)")
        return real(tensor, qtype)

    monkeypatch.setattr(plan, "encode_float", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["convert", str(checkpoint), "-o", str(out / "m.gguf"), "-q"])
    assert calls["n"] == 10
    assert list(out.iterdir()) == []
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()}
    assert before == after


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moeq2gguf.cli", "convert", str(tmp_path / "nope"), "-o",
                           str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moeq2gguf: error:") and "is not a directory" in proc.stderr
