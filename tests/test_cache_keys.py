"""Cached measurements are reused only for the same inputs: one test per input of the allocator's sensitivity key
(the transforms, the tokenizer files and the code were missing from it before), and the checkpoint fingerprint
follows a changed file without reading every byte of a large one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest

from moeq2gguf.io import fingerprint
from moeq2gguf.passes.quantize import QuantConfig
from moeq2gguf.quant import sensitivity

FIXTURE = Path(__file__).resolve().parents[1] / "moeq2gguf" / "fixtures" / "qwen2moe-tiny"
Q = gguf.GGMLQuantizationType
CANDIDATES = {"blk.0.attn_q.weight": [Q.Q4_K, Q.Q8_0]}
BASE = {"rotate": ["hadamard", 0], "smooth": []}


@pytest.fixture()
def model(tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(FIXTURE, out)   # copy2: the same mtimes
    return out


def key(model_dir, cfg=None, candidates=CANDIDATES, transforms=BASE) -> Path:
    return sensitivity.cache_key(model_dir, cfg or QuantConfig(method="moequant"), candidates, transforms)


def test_same_inputs_same_key(model):
    assert key(model) == key(model) and key(model) == key(FIXTURE)


@pytest.mark.parametrize("transforms", [{"rotate": None, "smooth": []}, {"rotate": ["hadamard", 1], "smooth": []},
                                        {"rotate": ["hadamard", 0], "smooth": ["aggregate"]},
                                        {"rotate": ["hadamard", 0], "smooth": ["aggregate", "down"]}],
                         ids=["no rotation", "other seed", "smoothing", "other smoothing"])
def test_each_transform_misses_the_cache(model, transforms):
    assert key(model, transforms=transforms) != key(model)


@pytest.mark.parametrize("edit", ["tokenizer_config.json", "tokenizer.model", "config.json", "tokenizer.json"])
def test_each_tokenizer_or_config_file_misses_the_cache(model, edit):
    before = key(model)
    path = model / edit
    if path.exists():
        path.write_text(path.read_text().replace("}", ', "added_by_test": 1}', 1) if path.suffix == ".json" else "x")
    else:
        path.write_bytes(b"a sentencepiece model")   # a tokenizer file the checkpoint did not have
    assert key(model) != before


def test_method_calibration_and_candidates_miss_the_cache(model):
    base = key(model)
    assert key(model, QuantConfig(method="gptq")) != base
    assert key(model, QuantConfig(method="moequant", n_windows=8)) != base
    assert key(model, QuantConfig(method="moequant", calib="eval")) != base
    assert key(model, candidates={"blk.0.attn_q.weight": [Q.Q4_K]}) != base


def test_other_code_misses_the_cache(model, monkeypatch):
    base = key(model)
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda: "another version")
    assert key(model) != base


def test_weights_rewritten_miss_and_a_large_file_is_sampled(model, monkeypatch):
    weights = model / "model.safetensors"
    before = fingerprint.checkpoint_fingerprint(model)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1   # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert fingerprint.checkpoint_fingerprint(model) != before        # rewritten: new mtime (and the last block)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint.checkpoint_fingerprint(model) != before        # same size and mtime: the sampled last block
    reads = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        fh = real_open(self, *args, **kwargs)
        real_read = fh.read
        fh.read = lambda n=-1: reads.append(len(real := real_read(n))) or real
        return fh
    monkeypatch.setattr(Path, "open", counting_open)
    fingerprint.checkpoint_fingerprint(model)
    assert sum(reads) < 0.25 * weights.stat().st_size + 4 * fingerprint.SMALL   # not every byte of the weights
