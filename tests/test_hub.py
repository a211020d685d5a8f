"""MODEL as a Hugging Face Hub id: resolved through huggingface_hub's cache, downloaded when the Hub answers
(a local stand-in here: tests/fake_hub.py, so huggingface_hub itself lays out the cache), found offline when
complete, and a one-line error naming what is missing otherwise."""
from __future__ import annotations

import os
import subprocess
import sys

import gguf
import pytest

from fake_hub import COMMIT, FakeHub
from testing import random_model, save_checkpoint

REPO = "tiny-org/tiny-moe"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory, small_tokenizers):
    path = save_checkpoint(random_model("qwen3moe"), small_tokenizers["qwen2moe"], tmp_path_factory.mktemp("repo") / "r")
    (path / "pytorch_model.bin").write_bytes(b"a duplicate of the weights that a conversion never reads")
    return path


def _run(args: list[str], hf_home, endpoint: str | None = None, offline: bool = False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["HF_ENDPOINT"] = endpoint or "http://127.0.0.1:9"   # nothing listens there: the Hub cannot be reached
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "moeq2gguf", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _tensors(path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}


def test_hub_id_downloads_then_resolves_offline(repo_dir, tmp_path):
    hf_home = tmp_path / "hf"
    with FakeHub({REPO: repo_dir}) as hub:
        first = _run(["convert", REPO, "-o", str(tmp_path / "a.gguf"), "--type", "Q8_0", "-q"], hf_home, hub.endpoint)
        assert first.returncode == 0, first.stderr
        fetched = {r.split(f"/resolve/{COMMIT}/")[-1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    assert "pytorch_model.bin" not in fetched                      # only what a conversion reads
    snapshot = hf_home / "hub" / "models--tiny-org--tiny-moe" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["general.name"].contents() == "tiny-moe"

    # the hub is gone; offline (explicitly, and by an unreachable endpoint) the cached snapshot is used
    for offline in (True, False):
        again = _run(["convert", REPO, "-o", str(tmp_path / "b.gguf"), "--type", "Q8_0", "-q"], hf_home, offline=offline)
        assert again.returncode == 0, again.stderr
        assert _tensors(tmp_path / "b.gguf") == _tensors(tmp_path / "a.gguf")

    # a shard lost from the cache: the error names it, nothing is written
    (snapshot / "model.safetensors").unlink()
    broken = _run(["convert", REPO, "-o", str(tmp_path / "c.gguf"), "--type", "Q8_0", "-q"], hf_home, offline=True)
    lines = broken.stderr.strip().splitlines()
    assert broken.returncode == 2 and len(lines) == 1, broken.stderr
    assert "incomplete" in lines[0] and "model.safetensors" in lines[0] and "hf download tiny-org/tiny-moe" in lines[0]
    assert not (tmp_path / "c.gguf").exists()


@pytest.mark.parametrize("case", ["offline-uncached", "unknown-repo"])
def test_hub_id_errors_say_what_is_missing(case, repo_dir, tmp_path):
    hf_home = tmp_path / "hf"
    with FakeHub({REPO: repo_dir}) as hub:
        if case == "offline-uncached":
            proc = _run(["convert", REPO, "-o", str(tmp_path / "x.gguf")], hf_home, offline=True)
            expected = ["not a local folder and not in the Hugging Face cache", "HF_HUB_OFFLINE=1", "hf download"]
        else:
            proc = _run(["convert", "tiny-org/no-such-model", "-o", str(tmp_path / "x.gguf")], hf_home, hub.endpoint)
            expected = ["neither a local folder nor a repository on the Hub"]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(e in lines[0] for e in expected), lines[0]
    assert not (tmp_path / "x.gguf").exists()
