"""Peak resident memory of a conversion grows with one layer, not with depth (tools/bench_memory.py:
each conversion in its own process, measured by /usr/bin/time -v)."""
from __future__ import annotations

import json
import subprocess
import sys

from util import REPO


def test_peak_rss_does_not_grow_with_depth():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), "--layers", "10", "--also-layers",
                           "3", "--hidden", "256", "--experts", "8", "--expert-width", "1024", "--type", "F16", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    deep = json.loads(proc.stdout)
    shallow = deep["other_depth"]
    layer = deep["layer_f32_bytes"]
    assert layer == shallow["layer_f32_bytes"] > 20 * 2**20
    for r in (shallow, deep):
        assert r["within_bound"], r
        assert r["peak_rss_bytes"] <= 2 * layer + 1.5e9
    # 7 more layers (7 x 25 MiB of float32 read) may add allocator noise, not a layer per layer
    assert deep["peak_rss_bytes"] - shallow["peak_rss_bytes"] < layer, deep
    # above the cost of the imports, the conversion holds about one layer's tensors at a time
    assert deep["peak_rss_bytes"] - deep["import_baseline_rss_bytes"] < 4 * layer, deep
