"""Files that need the patched llama.cpp (--smooth per-expert, --expert-hadamard) go through `eval` and `bench`
like any other: evaluate_many runs them in a process bound to the patched llama.cpp, bench_file picks the
runtime per call (patched=True / False, by default what the file needs) and the row says which one ran."""
from __future__ import annotations

from pathlib import Path

import pytest

from moeq2gguf import Moeq2ggufError, convert, runtime
from moeq2gguf.runtime import bench
from moeq2gguf.runtime import build as runtime_build
from moeq2gguf.eval import evaluate, evaluate_many
from testing import random_model, save_checkpoint

CALIB = dict(calib_windows=4, calib_ctx=64)
EVAL = dict(ctx=64, chunks=3, progress=False)
BENCH = dict(threads=(1,), ctx=32, gen=4, repeats=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_tokenizers, eval_text) -> dict[str, Path]:
    """A random qwen2moe model as F32 (stock), F32 with both expert transforms (patched) and Q8_0 of each."""
    runtime_build.build()   # cached (`make setup` builds it)
    tmp = tmp_path_factory.mktemp("eval_patched")
    ckpt = save_checkpoint(random_model("qwen2moe"), small_tokenizers["qwen2moe"], tmp / "ckpt")
    out = {"plain": convert(ckpt, tmp / "plain.gguf", type="F32", progress=False).output,
           "transformed": convert(ckpt, tmp / "tf.gguf", type="F32", smooth="per-expert", expert_hadamard=True,
                                  progress=False, **CALIB).output,
           "plain_q8": convert(ckpt, tmp / "plain-q8.gguf", type="Q8_0", progress=False).output,
           "transformed_q8": convert(ckpt, tmp / "tf-q8.gguf", type="Q8_0", smooth="per-expert", expert_hadamard=True,
                                     progress=False, **CALIB).output}
    (tmp / "eval.txt").write_text(eval_text[:60_000])
    out["text"] = tmp / "eval.txt"
    assert runtime.patched_features(out["transformed"]) and not runtime.patched_features(out["plain"])
    return out


def test_evaluate_runs_a_patched_file(files):
    """The transformed F32 file is the untransformed model (within 1e-4 relative): KLD ~ 0 against the plain F32
    file, same top-1 everywhere. Without the patched runtime the file does not load at all."""
    res = evaluate(files["transformed"], files["plain"], str(files["text"]), **EVAL)
    assert res.windows == 3 and res.tokens_scored > 0
    assert res.kld_mean < 1e-6 and res.same_top1_pct == 100.0
    assert abs(res.ppl_ratio - 1) < 1e-4
    assert res.quant == str(files["transformed"])


def test_evaluate_many_mixes_stock_and_patched_files(files):
    """A stock quant evaluated beside a patched one (so on the patched runtime) gets exactly the figures it gets alone
    (on whatever this process runs): the patch changes nothing for files without the transforms."""
    alone = evaluate(files["plain_q8"], files["plain"], str(files["text"]), **EVAL)
    both = evaluate_many([files["plain_q8"], files["transformed_q8"]], files["plain"], str(files["text"]), **EVAL)
    assert both[0].kld_mean == alone.kld_mean and both[0].ppl_quant == alone.ppl_quant
    assert both[0].same_top1_pct == alone.same_top1_pct
    # Q8_0 of the transformed weights stays about as close to the float model as Q8_0 of the plain ones
    assert 0 < both[1].kld_mean < 10 * both[0].kld_mean + 1e-4


def test_evaluate_patched_file_errors_come_back(files, tmp_path):
    """An error inside the patched process comes back as a one-line Moeq2ggufError."""
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(Moeq2ggufError, match="fewer than one window"):
        evaluate(files["transformed"], files["plain"], str(short), **EVAL)


def test_bench_file_chooses_the_runtime(files):
    [auto] = bench.bench_file(files["transformed"], **BENCH)
    assert auto.runtime == "patched" and auto.pp_tok_s > 0 and auto.tg_tok_s > 0
    [stock] = bench.bench_file(files["plain"], **BENCH)
    assert stock.runtime == "stock"
    [patched] = bench.bench_file(files["plain"], patched=True, **BENCH)
    assert patched.runtime == "patched" and patched.tg_tok_s > 0
    assert patched.n_params == stock.n_params
    with pytest.raises(Moeq2ggufError, match="wrong number of tensors"):
        bench.bench_file(files["transformed"], patched=False, **BENCH)


def test_bench_worker_reports_the_library_it_bound(files):
    stock = bench.run_worker(files["plain"], 1, 32, 4, 1, bench.prompt_text(32), patched=False)
    patched = bench.run_worker(files["plain"], 1, 32, 4, 1, bench.prompt_text(32), patched=True)
    assert Path(stock["library"]).parent != Path(patched["library"]).parent
    assert (Path(patched["library"]).parent / runtime_build.STAMP).is_file()
