"""Nothing lost, nothing silently wrong: bad weights are refused by name, an interrupted conversion leaves no file
behind (SIGINT, SIGTERM), and the temporary file a SIGKILL leaves is removed by the next run for that output.
Each case checks the inputs are unchanged."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeq2gguf import convert
from moeq2gguf.errors import WeightError
from testing import random_model, save_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "moeq2gguf" / "fixtures" / "mixtral-tiny"


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def checkpoint_with(tmp_path, small_tokenizers):
    def make(edit) -> Path:
        model = random_model("qwen2moe", num_hidden_layers=2)
        with torch.no_grad():
            edit(model)
        return save_checkpoint(model, small_tokenizers["qwen2moe"], tmp_path / "ckpt")
    return make


def test_nan_in_one_expert_is_refused_by_name(checkpoint_with, tmp_path):
    def poison(model):
        experts = model.model.layers[1].mlp.experts
        experts.gate_up_proj[3, 0, :2] = float("nan")   # expert 3 of layer 1, the fused in-memory layout
    ckpt = checkpoint_with(poison)
    before = tree_hash(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("Q4_K_M", "F16"):
        with pytest.raises(WeightError, match=r"blk\.1\.ffn_(gate|up)_exps\.weight: 2 of \d+ values are NaN"):
            convert(ckpt, out / "m.gguf", type=kind, progress=False)
        assert list(out.iterdir()) == []
    written = convert(ckpt, out / "m.gguf", type="F32", allow_nonfinite=True, progress=False).output
    assert written.is_file()
    assert tree_hash(ckpt) == before


def test_f16_overflow_is_refused_and_f32_keeps_it(checkpoint_with, tmp_path):
    def big(model):
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5
    ckpt = checkpoint_with(big)
    with pytest.raises(WeightError, match=r"blk\.0\.attn_q\.weight: 1 values exceed F16's largest value 65504"):
        convert(ckpt, tmp_path / "m.gguf", type="F16", progress=False)
    assert not (tmp_path / "m.gguf").exists()
    convert(ckpt, tmp_path / "m.gguf", type="F32", progress=False)


def _start_conversion(out: Path) -> subprocess.Popen:
    code = "import sys; from moeq2gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    # A test runner started in the background (`make test &`) inherits SIGINT ignored, and Python then keeps it
    # ignored in the child, as Unix programs conventionally do: give the child SIGINT's default back, as a shell in
    # the foreground would, so that the signal reaches the conversion.
    return subprocess.Popen([sys.executable, "-c", code, "convert", str(FIXTURE), "-o", str(out), "--type", "Q4_K_M",
                             "--method", "moequant", "--calib-windows", "8", "-q", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_temp(out: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The conversion's temporary file, once it holds tensor data (the run is in its quantization pass)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        temps = list(out.parent.glob(f".{out.name}.*.tmp"))
        if temps and temps[0].stat().st_size > 2**20:
            return temps[0]
        if proc.poll() is not None:
            raise AssertionError(f"the conversion ended before it wrote data: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no temporary file appeared")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupted_conversion_leaves_nothing(tmp_path, sig, code, word):
    before = tree_hash(FIXTURE)
    out = tmp_path / "m.gguf"
    proc = _start_conversion(out)
    _wait_for_temp(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # the last line is the message, and no traceback (a library's warning printed earlier may precede it)
    assert lines[-1] == (f"moeq2gguf: {'interrupted' if sig == signal.SIGINT else 'terminated'} ({word}); the "
                         "unfinished output was removed") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    assert tree_hash(FIXTURE) == before


def test_a_killed_conversions_temp_is_removed_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "m.gguf"
    proc = _start_conversion(out)
    stale = _wait_for_temp(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert stale.exists()   # SIGKILL: nothing could clean up
    with caplog.at_level("WARNING"):
        convert(FIXTURE, out, type="Q4_0", progress=False)
    assert not stale.exists() and out.is_file()
    assert any("left by an interrupted conversion" in r.message for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_corrupted_shard_header_is_named(checkpoint_with, tmp_path):
    from moeq2gguf.errors import Moeq2ggufError
    ckpt = checkpoint_with(lambda model: None)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32   # the JSON header's start
    weights.write_bytes(bytes(data))
    before = tree_hash(ckpt)
    with pytest.raises(Moeq2ggufError, match="model.safetensors"):
        convert(ckpt, tmp_path / "m.gguf", type="F16", progress=False)
    assert not (tmp_path / "m.gguf").exists() and tree_hash(ckpt) == before


def test_a_full_disk_ends_with_one_line_and_no_file(tmp_path):
    """A size-limited file system, simulated with RLIMIT_FSIZE on the child (writes past 2 MiB fail with EFBIG)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
    out = tmp_path / "m.gguf"
    code = "import sys; from moeq2gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(FIXTURE), "-o", str(out), "--type", "F32", "-q"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moeq2gguf: error: writing {out} failed after "), proc.stderr
    assert "the disk or a quota is probably full; nothing was written" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_surfacing_as_another_error_still_reads_as_one(monkeypatch, capsys, tmp_path):
    """Ctrl-C landing inside a C extension can come back as that library's own error (safetensors' reader: ValueError
    "could not determine the shape of object type 'torch.storage.UntypedStorage'", seen in a test run): the CLI still
    exits as interrupted. Simulated: the signal handler runs, then the conversion fails with a ValueError."""
    import signal
    from moeq2gguf import cli
    monkeypatch.setattr(cli, "_SIGNALLED", [])
    error = ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    def interrupted(args):
        try:
            cli._interrupt(signal.SIGINT, None)
        except KeyboardInterrupt:
            raise error from None

    def failing(args):
        raise error

    parser = cli.build_parser()
    real_parse = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    try:
        for func, want in ((interrupted, 130), (failing, None)):
            monkeypatch.setattr(parser, "parse_args", lambda argv, f=func: _with_func(real_parse(argv), f))
            cli._SIGNALLED.clear()
            if want is None:   # without a signal, an error stays an error
                with pytest.raises(ValueError):
                    cli.main(["convert", str(FIXTURE), "-o", str(tmp_path / "m.gguf")])
            else:
                assert cli.main(["convert", str(FIXTURE), "-o", str(tmp_path / "m.gguf")]) == want
                assert capsys.readouterr().err.strip() == ("moeq2gguf: interrupted (SIGINT); the unfinished output was "
                                                           "removed")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _with_func(args, func):
    args.func = func
    return args
