"""The training suite (``python -m benchmarks train``): the smoke run end to end (``slow``: a minute
on 2 idle cores, it compiles eight training steps; ``pytest -m slow tests/test_bench_train.py``),
and the target verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_train
from benchmarks.train_report import FA_CONFIGS as FA
from benchmarks.train_report import targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_run_times_every_config_with_the_uncompiled_gradients(tmp_path):
    stem = tmp_path / "train"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "train", "--smoke", "--out", str(stem)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["family"], r["tokens"]) for r in report["rows"]] == [(f, n) for f, n, _ in bench_train.SMOKE.cases]
    for row in report["rows"]:
        assert set(row["configs"]) == set(bench_train.CONFIGS)
        for name, c in row["configs"].items():
            assert c["median_s"] > 0 and c["first_call_s"] > 0 and c["grads_compared"], (row["family"], name)
            assert c["max_grad_diff_rel"] < 1e-4, (row["family"], name, c["max_grad_diff_rel"])
    (memory,) = report["memory"]
    assert set(memory["configs"]) == set(bench_train.CONFIGS)
    assert all("peak_growth_mib" in m and m["first_call_s"] > 0 for m in memory["configs"].values()), memory
    (pair,) = report["pairs"]
    assert set(pair["configs"]) == set(bench_train.CONFIGS) - {"uncompiled"}
    for name, c in pair["configs"].items():
        assert c["uncompiled"]["median_s"] > 0 and c[name]["median_s"] > 0, (name, c)


def _row(vs, first, inductor_first=10.0):
    configs = {n: {"vs_uncompiled": vs, "first_call_s": first} for n in ("fastattention", "fastattention_eager_attn")}
    configs["inductor"] = {"first_call_s": inductor_first}
    return {"family": "llama", "tokens": 2048, "dtype": "fp32", "configs": configs}


def test_targets_say_met_or_missed():
    met = targets({"rows": [_row(1.2, 12.0)], "memory": []})
    assert len(met) == 2 and all("(target ≥ 1.1×: met)" in line and "(target ≤ 1.5×: met)" in line for line in met)
    missed = targets({"rows": [_row(0.99, 20.0)], "memory": []})
    assert "missed by 10%" in missed[0] and "(target ≤ 1.5×: missed)" in missed[0]
    assert targets({"rows": [], "memory": []}) == ["- the target's case (Llama, 2048 tokens, fp32) was not in this run"]


def test_speed_target_reads_the_ab_pairs():
    """The four-way run's ratio (1.2) gives way to the A/B children's (1.5 / 1.4 ≈ 1.07)."""
    pair = {"family": "llama", "tokens": 2048,
            "configs": {n: {"uncompiled": {"median_s": 1.5}, n: {"median_s": 1.4}} for n in ("inductor", *FA)}}
    lines = targets({"rows": [_row(1.2, 12.0)], "memory": [], "pairs": [pair]})
    assert all("1.07× uncompiled (A/B in a fresh process) (target ≥ 1.1×: missed" in line for line in lines), lines


def test_first_call_target_reads_the_fresh_process_runs():
    """In-process first calls (here 12 s against Inductor's 10) give way to fresh-process ones (20 against 10)."""
    fresh = {"family": "llama", "tokens": 2048,
             "configs": {n: {"first_call_s": t} for n, t in
                         (("inductor", 10.0), ("fastattention", 20.0), ("fastattention_eager_attn", 12.0))}}
    lines = targets({"rows": [_row(1.2, 12.0)], "memory": [fresh]})
    assert "2.00× Inductor's (each in a fresh process) (target ≤ 1.5×: missed)" in lines[0], lines[0]
    assert "1.20× Inductor's (each in a fresh process) (target ≤ 1.5×: met)" in lines[1], lines[1]
