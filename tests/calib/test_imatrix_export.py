"""calibrate --imatrix-out: our statistics in llama.cpp's GGUF imatrix format. On the same text and windows the
plain file equals llama-imatrix's own, entry by entry (a reference that is not ours), and llama-quantize accepts
both weightings; the KLDs of the resulting files are printed next to llama-imatrix's."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert
from moeq2gguf.calib import calibrate, corpus
from moeq2gguf.eval.perplexity import evaluate_many
from moeq2gguf.runtime.llama_tools import llama_tool, run_tool
from util import FIXTURES

WINDOWS, CTX = 8, 256


def _entries(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data, dtype=np.float64).ravel() for t in gguf.GGUFReader(path).tensors}


# mixtral-tiny measured the same way on 2026-12-06 (KLDs in BENCHMARKS-style lines in the closing note); one model
# keeps the suite within its time budget
@pytest.mark.parametrize("model", ["qwen2moe-tiny"])
def test_imatrix_equals_llama_imatrix_and_quantizes(model, tmp_path, one_thread):
    model_dir = FIXTURES / model
    text = tmp_path / "calib.txt"
    text.write_text(corpus.read_text("calib")[:400_000])
    base = convert(model_dir, tmp_path / "f32.gguf", type="F32", progress=False).output
    theirs = tmp_path / "llama.imatrix.gguf"
    run_tool([llama_tool("llama-imatrix"), "-m", base, "-f", text, "-o", theirs, "-c", CTX, "--chunks", WINDOWS, "-t", 1])
    ours = {w: calibrate(model_dir, imatrix_out=str(tmp_path / f"{w}.imatrix.gguf"), imatrix_weighting=w,
                         calib=str(text), calib_windows=WINDOWS, calib_ctx=CTX, progress=False).imatrix.output
            for w in ("plain", "affinity")}

    fields = gguf.GGUFReader(ours["plain"]).fields
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.chunk_count"].contents() == WINDOWS and fields["imatrix.chunk_size"].contents() == CTX
    assert fields["moeq2gguf.imatrix.weighting"].contents() == "plain"

    a, b = _entries(theirs), _entries(ours["plain"])
    # llama-imatrix also records the routers' inputs, which llama-quantize never quantizes; we add the output head's
    quantizable = {n for n in a if ".ffn_gate_inp" not in n}
    assert quantizable <= set(b) and set(b) - quantizable <= {"output.weight.in_sum2", "output.weight.counts"}
    expert_counts = [n for n in quantizable if "_exps." in n and n.endswith(".counts")]
    assert expert_counts and all(a[n].size > 1 for n in expert_counts)   # per expert
    for n in sorted(quantizable):
        if n.endswith(".counts"):   # a near-tie in a router may send one token elsewhere (float32 here and there)
            assert np.abs(a[n] - b[n]).max() <= 1, n
            assert a[n].sum() == b[n].sum(), n
        else:
            assert np.abs(a[n] - b[n]).max() <= 1e-2 * np.abs(a[n]).max(), n
    aff = _entries(ours["affinity"])
    assert aff.keys() == b.keys()
    for n in b:   # unrouted inputs and every count are the plain ones; routed (and gated shared) sums are reweighted
        routed = ("_exps." in n or "_shexp." in n) and n.endswith(".in_sum2")
        assert np.allclose(aff[n], b[n], rtol=1e-6) != routed or not np.any(b[n]), n

    files = []
    for tag, imatrix in (("llama-imatrix", theirs), ("ours plain", ours["plain"]), ("ours affinity", ours["affinity"])):
        for mix in ("Q4_K_M", "Q2_K"):
            out = tmp_path / f"{tag.replace(' ', '-')}-{mix}.gguf"
            run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix, base, out, mix, "1"])
            files.append((tag, mix, out))
    evals = tmp_path / "eval.txt"
    evals.write_text(corpus.read_text("eval")[:60_000])
    results = evaluate_many([f for _, _, f in files], base, str(evals), ctx=CTX, chunks=8, progress=False)
    kld = {(tag, mix): r.kld_mean for (tag, mix, _), r in zip(files, results)}
    for mix in ("Q4_K_M", "Q2_K"):
        print(f"{model} {mix}: llama-quantize --imatrix, mean KLD: llama-imatrix {kld['llama-imatrix', mix]:.5f}, "
              f"ours plain {kld['ours plain', mix]:.5f}, ours affinity {kld['ours affinity', mix]:.5f}")
        assert kld["ours plain", mix] <= 1.05 * kld["llama-imatrix", mix]
        assert kld["ours affinity", mix] <= 1.25 * kld["llama-imatrix", mix]   # a guard against breakage only


def test_imatrix_out_must_be_gguf(tmp_path):
    with pytest.raises(Moeq2ggufError, match="must end in .gguf"):
        calibrate(FIXTURES / "qwen2moe-tiny", imatrix_out=str(tmp_path / "x.dat"), progress=False)
    assert not any(tmp_path.iterdir())
