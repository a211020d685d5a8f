"""`moeq2gguf eval`: metrics, agreement with llama-perplexity, and clear errors on bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moeq2gguf import cli, convert
from moeq2gguf.eval import evaluate
from moeq2gguf.eval.metrics import LogHistogram, QualityAccumulator, kl_divergence, log_softmax
from moeq2gguf.runtime.llama_tools import llama_perplexity_kld, llama_quantize
from testing import random_model, save_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_tokenizers):
    tmp = tmp_path_factory.mktemp("eval")
    qwen = save_checkpoint(random_model("qwen2moe", hidden_size=256, num_hidden_layers=2), small_tokenizers["qwen2moe"], tmp / "q")
    mixtral = save_checkpoint(random_model("mixtral", hidden_size=256, num_hidden_layers=2), small_tokenizers["mixtral"], tmp / "m")
    base = convert(qwen, tmp / "base.gguf", type="F32", progress=False).output
    quant = llama_quantize(base, tmp / "q4km.gguf", "Q4_K_M")
    other = convert(mixtral, tmp / "other.gguf", type="F32", progress=False).output
    return dict(base=base, quant=quant, other=other, tmp=tmp)


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    base, quant = rng.normal(size=(50, 30)) * 3, rng.normal(size=(50, 30)) * 3
    targets = rng.integers(0, 30, 50)
    acc = QualityAccumulator()
    acc.add(base[:20], quant[:20], targets[:20])
    acc.add(base[20:], quant[20:], targets[20:])
    s = acc.summary()
    p, q = np.exp(log_softmax(base)), np.exp(log_softmax(quant))
    kld = (p * np.log(p / q)).sum(-1)
    assert np.isclose(s["kld_mean"], kld.mean())
    assert np.isclose(s["ppl_base"], np.exp(-np.log(p[np.arange(50), targets]).mean()))
    assert np.isclose(s["same_top1_pct"], 100 * (base.argmax(-1) == quant.argmax(-1)).mean())
    assert abs(s["kld_p99"] / np.percentile(kld, 99, method="inverted_cdf") - 1) < 0.01
    assert np.allclose(kl_divergence(log_softmax(base), log_softmax(base)), 0)


def test_histogram_memory_is_fixed():
    h = LogHistogram()
    size = h.counts.nbytes
    h.add(np.random.default_rng(0).exponential(0.01, 100_000))
    assert h.counts.nbytes == size and h.counts.sum() == 100_000


def test_eval_agrees_with_llama_perplexity(models, tmp_path):
    """PPL and mean KLD within 0.5% of llama-perplexity --kl-divergence on the same files and windows."""
    ours = evaluate(models["quant"], models["base"], "eval", ctx=256, chunks=4, progress=False)
    from moeq2gguf.calib import corpus
    text = tmp_path / "eval.txt"
    text.write_text(corpus.read_text("eval"))
    ppl, kld = llama_perplexity_kld(models["base"], models["quant"], text, 256, 4, tmp_path)
    assert abs(ours.ppl_quant / ppl - 1) < 0.005
    assert abs(ours.kld_mean / kld - 1) < 0.005
    assert ours.windows == 4 and ours.tokens_scored == 4 * 127


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_json_output(models, capsys):
    code, out, _ = run_cli(["eval", str(models["quant"]), "--base", str(models["base"]), "--ctx", "128", "--chunks", "2", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["windows"] == 2 and data["kld_mean"] >= 0 and 0 <= data["same_top1_pct"] <= 100


def test_different_architecture_is_refused(models, capsys):
    code, _, err = run_cli(["eval", str(models["other"]), "--base", str(models["base"])], capsys)
    assert code == 2 and "is a llama model but base.gguf is qwen2moe" in err and len(err.splitlines()) == 1


def test_different_vocabulary_is_refused(models, tmp_path, small_tokenizers, capsys):
    from testing import train_bpe_tokenizer
    tok = train_bpe_tokenizer(["completely different text " * 200], 300, "qwen2moe")
    ckpt = save_checkpoint(random_model("qwen2moe", hidden_size=256, num_hidden_layers=2, vocab_size=300), tok, tmp_path / "v")
    other_vocab = convert(ckpt, tmp_path / "v.gguf", type="F32", progress=False).output
    code, _, err = run_cli(["eval", str(other_vocab), "--base", str(models["base"])], capsys)
    assert code == 2 and "different vocabularies" in err


def test_text_too_short(models, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    code, _, err = run_cli(["eval", str(models["quant"]), "--base", str(models["base"]), "--text", str(short)], capsys)
    assert code == 2 and "fewer than one window of --ctx 512" in err


def test_unreadable_files(models, tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    code, _, err = run_cli(["eval", str(junk), "--base", str(models["base"])], capsys)
    assert code == 2 and "is not a readable GGUF file" in err
    code, _, err = run_cli(["eval", str(models["quant"]), "--base", str(tmp_path / "missing.gguf")], capsys)
    assert code == 2 and "does not exist" in err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli(["eval", str(models["quant"]), "--base", str(models["base"]), "--text", str(binary)], capsys)
    assert code == 2 and "is not UTF-8 text" in err


def test_routing_agreement(tmp_path, small_tokenizers):
    from moeq2gguf.eval.routing import routing_agreement
    ckpt = save_checkpoint(random_model("mixtral", hidden_size=256, num_hidden_layers=2), small_tokenizers["mixtral"], tmp_path / "m")
    f32 = convert(ckpt, tmp_path / "f32.gguf", type="F32", progress=False).output
    q2 = convert(ckpt, tmp_path / "q2.gguf", type="Q2_K", progress=False).output
    assert routing_agreement(f32, ckpt, windows=1, ctx=256) == [100.0, 100.0]
    low = routing_agreement(q2, ckpt, windows=1, ctx=256)
    assert len(low) == 2 and all(0 <= a < 100 for a in low)
