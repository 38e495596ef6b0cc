"""The decode suite (``python -m benchmarks decode``): the smoke run end to end, and the target verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_decode
from benchmarks.decode_report import targets

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_every_method_and_config(tmp_path):
    stem = tmp_path / "decode"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "--smoke", "--out", str(stem)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["read_bandwidth"]["gbps"] > 0 and "Read bandwidth" in md
    assert len(report["op"]) == len(bench_decode.SMOKE.op_cases)
    for row in report["op"]:
        assert set(row["methods"]) == set(bench_decode.OP_METHODS)
        tol = 1e-5 if row["dtype"] == "fp32" else 2e-2
        for name, m in row["methods"].items():
            assert "error" not in m, (row["cache"], name, m)
            assert m["median_s"] > 0 and m["gbps"] > 0 and m["max_abs_err"] < tol, (row["cache"], name, m)
        fused, found = map(int, row["methods"]["fastattention"]["fused"].split("/"))
        assert fused == found == 1
    assert [(r["cache"], r["batch"], r["dtype"]) for r in report["model"]] == [
        ("static", 1, "fp32"), ("static", 1, "fp32"), ("dynamic", 1, "fp32"), ("static", 2, "bf16")]
    for row in report["model"]:
        tol = 1e-4 if row["dtype"] == "fp32" else 5e-2
        for config, c in row["configs"].items():
            assert c["median_s"] > 0 and c["max_abs_diff_logits"] < tol, (row["cache"], config, c)
            assert c["graphs_compiled_after"] == 0, "a decode step recompiled"
        assert row["configs"]["fastattention"]["graphs_compiled_first_call"] <= 1
    assert int(report["model"][-1]["fused"].split("/")[0]) > 0
    op_section = md.split("## Model step")[0]
    rows = [line for line in op_section.splitlines() if line.startswith("| 1 | fp32 |")]
    assert len(rows) == 2 and "—" not in rows[0].split("|")[5]


def _op_row(cache, vs_sdpa, of_bandwidth):
    return {"batch": 1, "dtype": "fp32", "cache": cache, "context": 32768,
            "methods": {"fastattention": {"vs_sdpa": vs_sdpa, "of_bandwidth": of_bandwidth}}}


def test_targets_say_met_or_missed_by_how_much():
    report = {"op": [_op_row("dynamic", 3.3, 0.6), _op_row("static", 2.4, 0.4)],
              "model": [{"cache": "static", "filled": 16384, "slots": 32768,
                         "configs": {"fastattention": {"vs_uncompiled": 1.2}}},
                        {"cache": "static", "filled": 1024, "slots": 32768,
                         "configs": {"fastattention": {"vs_uncompiled": 9.0}}}]}
    lines = targets(report)
    assert len(lines) == 3
    assert "3.30× SDPA (target 3.0×: met)" in lines[0] and "(aim 50%: met)" in lines[0]
    assert "missed by 20%" in lines[1] and "(aim 50%: missed by 20%)" in lines[1]
    assert "1.20× uncompiled (target 1.5×: missed by 20%)" in lines[2]
    assert targets({"op": [], "model": []}) == ["- the targets' sizes (32K keys, a half-filled 32K cache) were not in this run"]
