"""FP8 checkpoints (DeepSeek-V3 / Kimi-K2 / Qwen3 / GLM FP8 releases): e4m3 weights with 128 x 128 block scales
(weight_scale_inv) are dequantized exactly while streaming, and such checkpoints convert."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq2gguf import convert, runtime
from moeq2gguf.io.checkpoint import CheckpointReader
from testing import random_model, save_checkpoint

E4M3_MAX = 448.0
BLOCK = 128


def to_fp8_checkpoint(src, dst, block=BLOCK) -> dict[str, torch.Tensor]:
    """What DeepSeek's FP8 release does to a bf16 checkpoint: every linear weight but the routers, embeddings and the
    head becomes e4m3 with one float32 scale per block x block (scale = block amax / 448, stored as weight_scale_inv).
    Returns the bf16 originals of the converted weights."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (dst / "config.json").write_text(json.dumps(config))
    tensors, originals = load_file(src / "model.safetensors"), {}
    out = {}
    for name, w in tensors.items():
        skip = w.dim() != 2 or any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.", "norm"))
        if skip:
            out[name] = w
            continue
        originals[name] = w
        rows, cols = w.shape
        padded = torch.zeros(math.ceil(rows / block) * block, math.ceil(cols / block) * block)
        padded[:rows, :cols] = w.float()
        blocks = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
        scale = blocks.abs().amax((1, 3)).clamp_min(1e-12) / E4M3_MAX
        q = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
        out[name], out[f"{name}_scale_inv"] = q, scale
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return originals


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """From the format's definition, element by element block: w[i, j] = q[i, j] * scale[i // block, j // block]."""
    rows, cols = q.shape
    i = torch.arange(rows)[:, None] // block
    j = torch.arange(cols)[None, :] // block
    return q.float() * scale[i, j]


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3moe"])
def test_fp8_checkpoints_dequantize_exactly_and_convert(family, tmp_path, small_tokenizers):
    overrides = dict(hidden_size=256, moe_intermediate_size=160, intermediate_size=320)   # blocks that do not divide
    if family == "deepseek_v3":
        overrides.update(q_lora_rank=192, kv_lora_rank=128)
    model = random_model(family, **overrides)
    bf16 = save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "bf16", dtype=torch.bfloat16)
    originals = to_fp8_checkpoint(bf16, tmp_path / "fp8")
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    reader = CheckpointReader(tmp_path / "fp8")
    assert any(stored[n].shape[0] % BLOCK or stored[n].shape[1] % BLOCK for n in originals)
    for name, w in originals.items():
        got = reader.get(name)
        ref = reference_dequant(stored[name], stored[f"{name}_scale_inv"])
        assert torch.equal(got, ref), name
        # within e4m3's rounding of the original: half a step (2^-3 relative) of the value, or of the block's
        # smallest normal, whichever is larger
        err = (got - w.float()).abs()
        scale = reference_dequant(torch.ones_like(stored[name], dtype=torch.float32), stored[f"{name}_scale_inv"])
        assert bool((err <= torch.maximum(w.float().abs() * 2**-4, scale * 2**-9)).all()), name
    out = convert(tmp_path / "fp8", tmp_path / "fp8.gguf", type="F32", progress=False).output
    import gguf
    written = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    name = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(written["blk.1.attn_output.weight"],
                                  reference_dequant(stored[name], stored[f"{name}_scale_inv"]).numpy())
    with runtime.load(out) as llm:
        assert np.isfinite(runtime.logits(llm, list(range(5, 37)))).all()
    convert(tmp_path / "fp8", tmp_path / "fp8-q4.gguf", type="Q4_K_M", method="moequant", calib_windows=2, calib_ctx=64,
            progress=False)
