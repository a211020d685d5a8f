"""`moeq2gguf bench`: a row per thread count with positive figures, JSON, peak RSS equal to what
/usr/bin/time -v reports for the same work, and one-line errors. Nothing here checks a speed."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import moeq2gguf
from moeq2gguf import cli
from moeq2gguf.runtime import bench
from util import FIXTURES

SMALL = ["--ctx", "32", "--gen", "4", "--repeats", "2"]
USR_BIN_TIME = Path("/usr/bin/time")


@pytest.fixture(scope="module")
def q4km(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "qwen2moe-tiny-Q4_K_M.gguf"
    return moeq2gguf.convert(FIXTURES / "qwen2moe-tiny", out, type="Q4_K_M", progress=False).output


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_table_has_a_row_per_thread_count(q4km, capsys):
    code, out, err = run_cli(["bench", str(q4km), "--threads", "1,2", *SMALL], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{q4km.name}: qwen2moe, ") and "type Q4_K_M" in lines[0]
    assert lines[2].split() == ["threads", "load", "s", "pp", "tok/s", "tg", "tok/s", "peak", "RSS", "MiB"]
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        assert len(r) == 5 and all(float(x) > 0 for x in r[1:]), r


def test_json_parses_and_describes_the_file(q4km, capsys):
    code, out, err = run_cli(["bench", str(q4km), "--threads", "1", *SMALL, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc["machine"]) >= {"cpu", "cores", "usable_cores", "llama_cpp_python"}
    assert doc["machine"]["llama_cpp_python"] == "0.3.36"
    [row] = doc["rows"]
    assert row["threads"] == 1 and row["ctx"] == 32 and row["gen"] == 4 and row["repeats"] == 2
    assert row["file_type"] == "Q4_K_M" and row["moeq2gguf_type"] == "Q4_K_M" and row["architecture"] == "qwen2moe"
    assert row["file_bytes"] == q4km.stat().st_size
    assert row["n_params"] == moeq2gguf.inspect(q4km).n_elements     # llama.cpp's count = the file's tensors
    assert row["prompt"] == "eval split text"
    assert len(row["pp_runs"]) == len(row["tg_runs"]) == 2
    assert row["pp_tok_s"] > 0 and row["tg_tok_s"] > 0 and row["load_s"] > 0 and row["peak_rss_mib"] > 0


def test_bench_file_is_exported(q4km):
    [row] = moeq2gguf.bench_file(q4km, threads=(1,), ctx=32, gen=4, repeats=1)
    assert isinstance(row, moeq2gguf.BenchRow) and row.threads == 1 and row.tg_tok_s > 0


def max_rss_kib(time_v_stderr: str) -> int:
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_v_stderr).group(1))


@pytest.mark.skipif(not USR_BIN_TIME.exists(), reason="/usr/bin/time is not installed")
def test_peak_rss_equals_usr_bin_time(q4km):
    """The worker's own VmHWM against /usr/bin/time -v's maximum RSS of the same process, and
    bench_file's figure against /usr/bin/time of the same work. This pytest process has torch
    loaded (hundreds of MiB): a peak taken from getrusage in or of a child started from it would
    report this process's size, not the worker's (Linux carries ru_maxrss over exec)."""
    [row] = bench.bench_file(q4km, threads=(1,), ctx=64, gen=8, repeats=1)
    proc = subprocess.run([str(USR_BIN_TIME), "-v", *bench.worker_command()], capture_output=True, text=True,
                          input=bench.worker_request(q4km, 1, 64, 8, 1, bench.prompt_text(64)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    own = json.loads(proc.stdout)["peak_rss_bytes"] / 1024
    timed = max_rss_kib(proc.stderr)
    assert abs(own - timed) <= 0.1 * timed, (own, timed)
    assert abs(row.peak_rss_mib * 1024 - timed) <= 0.1 * timed, (row.peak_rss_mib * 1024, timed)


def unknown_arch_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "nonesuch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; pass a .gguf file"),
    ("directory", "is not a file; pass a .gguf file"),
    ("not_gguf", "is not a GGUF file (it starts with b'hell', a GGUF file with b'GGUF')"),
    ("unknown_arch", "unknown.gguf: unknown model architecture: 'nonesuch'"),
    ("truncated", "data is not within the file bounds"),
    ("bad_threads", "--threads 'one,2' is not a comma-separated list of integers"),
    ("zero_threads", "threads (0, 2) must be one or more positive integers"),
])
def test_errors_are_one_line_with_exit_code_2(case, expected, q4km, tmp_path, capsys):
    path, extra = tmp_path / "x.gguf", []
    if case == "directory":
        path = tmp_path
    elif case == "not_gguf":
        path.write_bytes(b"hello, world")
    elif case == "unknown_arch":
        path = unknown_arch_gguf(tmp_path / "unknown.gguf")
    elif case == "truncated":
        data = q4km.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case in ("bad_threads", "zero_threads"):
        path = q4km
        extra = ["--threads", "one,2" if case == "bad_threads" else "0,2"]
    code, out, err = run_cli(["bench", str(path), *extra, "--ctx", "32", "--gen", "4", "--repeats", "1"], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("moeq2gguf: error: "), err
    assert expected in err, err
