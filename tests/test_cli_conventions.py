"""What a command-line user expects: --version, python -m moeq2gguf, convert --json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "moeq2gguf" / "fixtures" / "qwen2moe-tiny"


def test_version_and_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "moeq2gguf", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("moeq2gguf 0.1.0 (llama-cpp-python 0.3.36)")


def test_convert_json_summary(tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "moeq2gguf", "convert", str(FIXTURE), "-o", str(out), "--type",
                           "Q4_K_M", "--method", "imatrix", "--calib-windows", "2", "--calib-ctx", "128", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["output"] == str(out) and 0 < summary["bytes"] < out.stat().st_size   # tensor data, without the header
    assert summary["tensors"] == 71 and summary["types"]["Q4_K"] > 0 and summary["methods"]["imatrix"] > 0
    assert summary["expert_coverage"] == {}   # imatrix has no Hessians to fall back on (gptq's: tests/quant/test_engine.py)
    assert {"read", "forward", "quantize", "write"} <= set(summary["profile"]["stages"])
