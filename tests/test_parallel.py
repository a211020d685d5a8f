"""Conversion under torchrun (moeq2gguf/parallel.py), on CPU with gloo: the file is byte-identical to one process's
at world sizes 2 and 3 (8 experts: an uneven 3/3/2 split; 2 batches, so one rank runs none; size 1 in
tools/bench_parallel.py), each rank keeps its share of the expert statistics, a
rank that dies ends the run with no output file, and what is not distributed yet is refused with the way out."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeq2gguf import parallel
from moeq2gguf.config import ConvertConfig
from moeq2gguf.errors import Moeq2ggufError
from testing import random_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizers):
    # rows of 256: the K-quant grids of Q4_K_M; 8 experts, top-2, a shared expert
    model = random_model("qwen2moe", hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                         num_hidden_layers=2, init_std=0.05)
    return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path_factory.mktemp("parallel") / "ckpt")


# the same thread count in every process: torch's CPU kernels round differently with another count
# 16 windows: two batches of 8, so at world size 3 one rank runs no batch at all (it still owns experts)
ARGS = ["--type", "Q4_K_M", "--method", "moequant", "--calib-windows", "16", "--calib-ctx", "32", "--threads", "1", "-q"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOEQ2GGUF_DIST_TIMEOUT": "60", **extra}


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "moeq2gguf", *args]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_expert_shares_cover_every_expert_once():
    for n_experts in (8, 60, 384):
        for size in (1, 2, 3, 7):
            shares = [parallel.expert_range(n_experts, size, r) for r in range(size)]
            assert [e for s in shares for e in s] == list(range(n_experts))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _peaks(stderr: str) -> list[float]:
    """Each rank's logged peak of a layer's routed statistics (MiB)."""
    return [float(line.split("peak expert statistics ")[1].split(" MiB")[0])
            for line in stderr.splitlines() if "peak expert statistics" in line]


def test_world_sizes_write_the_same_bytes_with_a_share_of_the_statistics(checkpoint, tmp_path):
    single = tmp_path / "single.gguf"
    proc = subprocess.run([sys.executable, "-m", "moeq2gguf", "-v", "convert", str(checkpoint), "-o", str(single), *ARGS],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    want, (one,) = _sha(single), _peaks(proc.stderr)
    for n in (3,):   # uneven (3/3/2 experts) and a rank without a batch; sizes 1 (the one-process path under
        # torchrun) and 2 (an even split) are in tools/bench_parallel.py
        out = tmp_path / f"w{n}.gguf"
        proc = subprocess.run(_torchrun(n, "-v", "convert", str(checkpoint), "-o", str(out), *ARGS),
                              capture_output=True, text=True, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(f"world size {n}: sha256 {_sha(out)} (one process: {want})")
        assert _sha(out) == want
        assert proc.stdout.count("wrote ") == 1   # rank 0 alone speaks
        peaks = _peaks(proc.stderr)
        print(f"world size {n}: peak expert statistics per rank {peaks} MiB, one process {one} MiB")
        assert len(peaks) == n
        # each rank's share of the 8 experts' sums, plus the pooled sums every rank keeps (float64 [K, K]: two
        # experts' worth)
        k = 256
        expert, pooled = 4 * k * k + 16 * k + 16, 8 * k * k + 8 * k + 16    # xx^T f32, sums of x^2 f64, counts
        shares = sorted((e * expert + pooled) / (8 * expert + pooled) for e in (2, 3, 3))
        assert all(abs(p / one - w) < 0.01 for p, w in zip(sorted(peaks), shares)), (peaks, one)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["single.gguf", "w3.gguf"]


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (its children with RANK in their environment)."""
    out = {}
    for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(child)
    return out


def test_a_dead_rank_ends_the_run_without_output(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen(_torchrun(2, "convert", str(checkpoint), "-o", str(out), "--type", "Q4_K_M", "--method",
                                      "moequant", "--calib-windows", "64", "--calib-ctx", "64", "--threads", "1", "-q"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while time.time() - t0 < 120:   # rank 0 has begun writing: both ranks are in the quantization pass
        if list(tmp_path.glob(".m.gguf.*.tmp")) and len(_rank_pids(proc.pid)) == 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        raise AssertionError("the conversion never started writing")
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    print(err[-1500:])
    assert proc.returncode != 0
    assert "rank" in err.lower() and ("exitcode" in err or "failed" in err)
    assert list(tmp_path.iterdir()) == []   # no output, no temporary file


def test_what_is_not_distributed_is_refused():
    with pytest.raises(Moeq2ggufError, match="--target-size/--target-bpw is not distributed yet; run this conversion as one"):
        parallel.refuse_unsupported(ConvertConfig(method="gptq", target_size="5MB"))
    with pytest.raises(Moeq2ggufError, match="--calib ebss"):
        parallel.refuse_unsupported(ConvertConfig(type="Q4_K_M", method="moequant", calib="ebss"))
    with pytest.raises(Moeq2ggufError, match="--refine"):
        parallel.refuse_unsupported(ConvertConfig(type="Q4_K_M", method="moequant", refine=10))
    parallel.refuse_unsupported(ConvertConfig(type="Q4_K_M", method="moequant"))
