"""moeq2gguf inspect: a GGUF's contents, and what convert will write for a checkpoint."""
from __future__ import annotations

import json

import gguf
import pytest

import moeq2gguf
from moeq2gguf import Moeq2ggufError, convert, inspect
from moeq2gguf.cli import main
from moeq2gguf.plan.mixes import MIXES
from testing import random_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizers):
    model = random_model("qwen2moe", num_hidden_layers=3)
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path_factory.mktemp("qwen2moe"))


def test_gguf(checkpoint, tmp_path):
    out = convert(checkpoint, tmp_path / "m.gguf", type="F16", progress=False).output
    result = inspect(out)
    assert (result.kind, result.architecture, result.n_layers, result.n_experts, result.n_experts_used) == \
        ("gguf", "qwen2moe", 3, 8, 2)
    assert result.file_type == "MOSTLY_F16"
    reader = gguf.GGUFReader(out)
    assert [t.name for t in result.tensors] == [t.name for t in reader.tensors]
    experts = next(t for t in result.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert (experts.shape, experts.type, experts.n_bytes) == ((64, 32, 8), "F16", 64 * 32 * 8 * 2)
    assert {s.type for s in result.by_type()} == {"F16", "F32"}
    assert all(t.type == "F32" for t in result.tensors if t.name.endswith(("norm.weight", "gate_inp.weight", ".bias")))
    assert result.n_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert 16 < result.bits_per_weight < 17  # F16 weights, a few F32 norms/routers/biases
    assert result.metadata["qwen2moe.expert_feed_forward_length"] == 32


# the i-quant mixes share one code path (their types are checked against llama-quantize in tests/test_mixes.py):
# two of them, one that needs an importance matrix and one that does not, cover it here
PLANNED_MIXES = ["F32", "BF16", "F16", *(m for m in MIXES if not m.startswith("IQ") or m in ("IQ2_XXS", "IQ3_XS"))]


@pytest.mark.parametrize("type_name", PLANNED_MIXES)
def test_checkpoint_plan_is_what_convert_writes(checkpoint, tmp_path, type_name):
    from moeq2gguf.plan.mixes import IMATRIX_MIXES
    planned = inspect(checkpoint, type=type_name)
    method = "imatrix" if type_name in IMATRIX_MIXES else "rtn"   # llama.cpp's i-quant mixes need an importance matrix
    written = inspect(convert(checkpoint, tmp_path / "m.gguf", type=type_name, method=method, calib_windows=2,
                              calib_ctx=64, progress=False).output)
    assert planned.kind == "checkpoint" and planned.hf_architecture == "Qwen2MoeForCausalLM"
    strip = lambda r: [(t.name, t.shape, t.type, t.n_bytes) for t in r.tensors]  # noqa: E731
    assert strip(planned) == strip(written)
    gate = next(t for t in planned.tensors if t.name == "blk.2.ffn_gate_exps.weight")
    assert gate.inputs == tuple(f"model.layers.2.mlp.experts.{e}.gate_proj.weight" for e in range(8))
    assert gate.role == "expert"
    assert planned.metadata["routing"]["renormalize"] is False


def test_cli_table_and_json(checkpoint, tmp_path, capsys):
    out = convert(checkpoint, tmp_path / "m.gguf", type="F16", progress=False).output
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "architecture qwen2moe" in table and "blk.0.ffn_down_exps.weight" in table and "bits per weight" in table
    assert main(["inspect", str(checkpoint), "--type", "F32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "checkpoint" and data["file_type"] == "F32" and data["n_experts"] == 8
    assert data["tensors"][0]["name"] == "token_embd.weight"


def test_missing_path_and_not_gguf(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(Moeq2ggufError, match="not a readable GGUF"):
        inspect(junk)


def test_exported_from_package():
    assert "inspect" in moeq2gguf.__all__ and moeq2gguf.inspect is inspect


def test_unsupported_architecture_is_refused_with_the_supported_list(checkpoint, tmp_path):
    out = tmp_path / "llama"
    out.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(Moeq2ggufError) as info:
        inspect(out)
    message = str(info.value)
    assert message.startswith("architecture LlamaForCausalLM is not supported; supported: ")
    for arch in ("DeepseekForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM",
                 "MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in message
