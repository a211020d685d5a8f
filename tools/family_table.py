"""The family table, from a test run: for every family, whether its float export equals transformers (llama.cpp's
F32 logits within 1e-4 relative, same argmax), whether the calibration forward equals transformers' layers
(within 1e-5), whether --method rtn is byte-identical to llama-quantize, and whether moequant calibrates it and
its file runs in llama.cpp. Runs exactly those tests (pytest, a JUnit report) and prints one row per family with
the number of tests behind each cell.

    .venv/bin/python tools/family_table.py [--markdown]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# column -> (test node prefix, how a test's parameter names its family)
COLUMNS = {
    "float export = transformers": [
        "tests/models/test_float_export.py::test_random_model_f32_matches_transformers",
        "tests/models/test_float_export.py::test_trained_model_f32_f16_bf16",
        "tests/models/test_deepseek.py::test_f32_matches_reference",
        *(f"tests/models/test_{m}.py::test_f32_matches_transformers"
          for m in ("deepseek2", "qwen3moe", "olmoe", "gpt_oss", "glm4moe", "minimax_m2", "qwen35moe", "llama4",
                    "ernie4_5_moe")),
        "tests/models/test_qwen35moe.py::test_hub_multimodal_layout",
        "tests/models/test_llama4.py::test_hub_multimodal_layout",
    ],
    "calibration forward = transformers": ["tests/test_nn.py::test_layer_outputs_match_transformers"],
    "rtn bytes = llama-quantize": ["tests/models/test_quantized_families.py::test_rtn_is_byte_identical_to_llama_quantize"],
    "moequant runs": ["tests/models/test_quantized_families.py::test_moequant_calibrates_every_family"],
}
FAMILIES = ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3", "gpt_oss",
            "glm4moe", "minimax_m2", "qwen35moe", "llama4", "ernie4_5_moe"]
NEW = {"glm4moe", "minimax_m2", "qwen35moe", "llama4", "ernie4_5_moe"}


def family_of(nodeid: str) -> str:
    file, _, test = nodeid.partition("::")
    param = re.search(r"\[(.*)\]", test)
    param = param.group(1) if param else ""
    stem = Path(file).stem.removeprefix("test_")
    if stem == "deepseek":
        return "deepseek"
    if stem == "deepseek2":
        return "deepseek_v3" if param.startswith(("v3", "kimi")) else "deepseek_v2"
    if stem in ("float_export", "nn", "quantized_families"):
        name = param.split("-")[0]
        return {"gpt": "gpt_oss", "minimax": "minimax_m2"}.get(name, name)
    return stem


def run(nodes: list[str]) -> dict[str, str]:
    """nodeid -> passed | failed | skipped, from one pytest run of exactly these tests."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *nodes],
                       cwd=REPO, check=False)
        outcomes = {}
        for case in ElementTree.parse(report).iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            nodeid = f"{module}.py::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            outcomes[nodeid] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
        return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (default: plain text)")
    args = parser.parse_args()
    outcomes = run(sorted({n for nodes in COLUMNS.values() for n in nodes}))
    cells: dict[tuple[str, str], list[str]] = {}
    for nodeid, outcome in outcomes.items():
        for column, prefixes in COLUMNS.items():
            if any(nodeid.startswith(p) for p in prefixes):
                cells.setdefault((family_of(nodeid), column), []).append(outcome)
    header = ["family", *COLUMNS]
    rows = []
    for family in FAMILIES:
        row = [family + (" (new)" if family in NEW else "")]
        for column in COLUMNS:
            got = cells.get((family, column), [])
            passed = got.count("passed")
            row.append("not tested" if not got else f"yes ({passed}/{len(got)})" if passed == len(got)
                       else f"NO ({passed}/{len(got)} passed)")
        rows.append(row)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    sys.exit(0 if all("NO" not in cell and cell != "not tested" for row in rows for cell in row[1:]) else 1)


if __name__ == "__main__":
    main()
