"""The benchmark entry point (``python -m benchmarks``), the shared helpers and the op-level suite's bookkeeping.

The smoke run checks the suite end to end on two tiny cases: files written, every peer present
in every case (a time or the recorded reason there is none), outputs close to the reference.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as entry
from benchmarks.attention_cpu_cases import DENSE, MASKS, METHODS, Case
from benchmarks.attention_cpu_methods import NOT_APPLICABLE, failure, visible
from benchmarks.attention_cpu_report import targets
from benchmarks.bench_attention_cpu import plan
from benchmarks.peak_memory import maxrss_mib, reset_peak, rss_mib, run_forked
from benchmarks.report_writing import missed_by, write_report
from benchmarks.timing import over_budget, predict_seconds

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_list_names_every_suite_without_importing_torch():
    proc = _run("-c", "import sys, benchmarks.__main__ as m; m.main(['--list']); print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "False"
    for name in entry.SUITES:
        assert any(line.split()[0] == name for line in lines[:-1]), name
    assert _run("-m", "benchmarks", "--list").stdout.strip() == entry.list_suites()


def test_unknown_suite_and_arguments_to_all_are_refused(capsys):
    assert entry.main(["no-such-suite"]) == 2
    assert "unknown suite 'no-such-suite'" in capsys.readouterr().err
    assert entry.main(["all", "--quick"]) == 2
    assert "default arguments" in capsys.readouterr().err


def test_missing_suite_module_says_so_but_broken_imports_raise(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(entry.SUITES, "ghost", entry.Suite("benchmarks.no_such_module", "x", "y"))
    assert entry.main(["ghost"]) == 2
    assert "benchmarks.no_such_module does not exist" in capsys.readouterr().err
    (tmp_path / "broken_suite_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(entry.SUITES, "broken", entry.Suite("broken_suite_mod", "x", "y"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        entry.main(["broken"])


def _peak_of_one_allocation(mib: int) -> dict:
    """In a forked child: the peak above baseline of touching ``mib`` MiB once, after a reset."""
    reset = reset_peak()
    base = rss_mib()
    block = b"\x01" * (mib * 1024**2)  # one allocation, every page written
    return {"peak": maxrss_mib() - base, "reset": reset, "size": len(block)}


def test_forked_peak_memory_is_the_childs_own():
    mib = random.Random(11).randint(40, 90)
    big = b"\x01" * (300 * 1024**2)  # touched pages: the parent's peak must not show up in the child's
    got = run_forked(_peak_of_one_allocation, mib)
    del big
    assert got["size"] == mib * 1024**2
    assert mib * 0.9 <= got["peak"] <= mib * 1.2 + 10, got
    assert run_forked(lambda: 1 / 0)["error"].startswith("ZeroDivisionError")


def test_failures_are_recorded_by_kind():
    assert failure(MemoryError("x"))["status"] == "oom"
    assert failure(RuntimeError("CPU: can't allocate memory\nmore"))["status"] == "oom"
    assert failure(NotImplementedError("no kernel"))["status"] == "unsupported"
    err = failure(ValueError("bad shape\nsecond line"))
    assert err == {"status": "error", "reason": "ValueError: bad shape"}


def test_report_files_and_target_wording(tmp_path):
    measured = random.Random(5).uniform(0.5, 0.99)
    assert missed_by(measured, 1.0, digits=1) == f"missed by {(1 - measured) * 100:.1f}%"
    report = {"x": measured, "path": tmp_path}  # not JSON-native: written as its text
    write_report(tmp_path / "sub" / "r", report, "# md\n")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": measured, "path": str(tmp_path)}
    assert (tmp_path / "sub" / "r.md").read_text() == "# md\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json", "r.md"]  # no .tmp left


@pytest.mark.parametrize("mask", MASKS)
def test_visible_pairs_count_the_mask(mask):
    seq = random.Random(mask).choice([37, 61, 97, 130])
    case = Case(seq, mask)
    vis = visible(case)
    expected = seq * seq * case.batch if vis is None else int(vis.expand(case.batch, 1, seq, seq).sum())
    assert case.visible_pairs() == expected


def test_budget_predicts_from_the_previous_length_and_skips_over_budget():
    rng = random.Random(7)
    small, large = Case(512, "window"), Case(2048, "window")
    for method in METHODS:
        measured_s = rng.uniform(0.01, 0.5)
        history = {(small.series, method): (small.work(method), measured_s)}
        grow = (2048 / 512) ** 2 if method in DENSE else large.visible_pairs() / small.visible_pairs()
        predicted = measured_s * grow
        assert predict_seconds(measured_s, small.work(method), large.work(method)) == pytest.approx(predicted)
        assert plan(method, large, history, predicted * 1.01, avail=None) is None
        if (method, "window") in NOT_APPLICABLE:  # never run, so never skipped: n/a is recorded instead
            assert plan(method, large, history, 1e-9, avail=None) is None
            continue
        skip = plan(method, large, history, predicted * 0.99, avail=None)
        assert skip["status"] == "skipped" and skip["predicted_s"] == pytest.approx(predicted)
        assert skip["reason"] == over_budget(predicted, predicted * 0.99)
        assert "over budget (predicted" in skip["reason"]
        # far beyond the measured size (overheads dominated there): no prediction, it runs
        assert plan(method, Case(2048 * 16, "window"), history, 1e-9, avail=None) is None
        # no history in this series (another dtype): nothing to predict from, so it runs
        assert plan(method, Case(2048, "window", "bf16"), history, 1e-9, avail=None) is None
    with pytest.raises(ValueError):
        predict_seconds(0.1, 0.0, 1.0)


def test_methods_that_hold_s_squared_tensors_are_skipped_when_they_exceed_ram():
    case = Case(32768)
    skip = plan("eager", case, {}, None, avail=8 * 1024**3)
    assert skip["status"] == "skipped" and "exceeds RAM" in skip["reason"]
    assert skip["predicted_gib"] > 0.8 * 8
    assert plan("op", case, {}, None, avail=8 * 1024**3) is None


def test_targets_say_met_or_missed_by_how_much():
    rng = random.Random(3)
    op, sdpa = rng.uniform(100, 130), rng.uniform(100, 130)
    eager = op * rng.uniform(3.0, 4.5)  # under the 5× target
    ok = lambda ms: {"status": "ok", "median_ms": ms, "min_ms": ms * 0.99}  # noqa: E731
    head = {"case": {"seq": 4096, "mask": "causal", "dtype": "fp32", "head_dim": 64, "kv_heads": 8},
            "methods": {"op": ok(op), "sdpa": ok(sdpa), "eager": ok(eager)}}
    op_total = rng.uniform(200, 900)
    memory = {"seq": 32768, "inputs_mib": 192.0, "methods": {
        "op": {"status": "ok", "total_mib": op_total},
        "eager": {"status": "skipped", "reason": "exceeds RAM (predicted 96.0 GiB)"}}}
    vs_sdpa, vs_eager, mem = targets({"cases": [head], "memory": [memory]})
    assert vs_sdpa["measured"] == pytest.approx(sdpa / op) and vs_sdpa["met"] == (sdpa >= op)
    assert vs_eager["measured"] == pytest.approx(eager / op) and vs_eager["met"] is False
    assert f"missed by {(1 - eager / op / 5) * 100:.1f}%" in vs_eager["detail"]
    assert "eager materializes" in vs_eager["detail"].lower()  # the bottleneck is explained
    assert mem["met"] is True and mem["measured"] == op_total
    memory["methods"]["op"]["total_mib"] = 1024 + op_total
    assert targets({"cases": [], "memory": [memory]})[2]["met"] is False
    assert all(t["met"] is None for t in targets({"cases": [], "memory": []}))


def test_smoke_run_writes_every_peer_for_every_case(tmp_path):
    proc = _run("-m", "benchmarks", "op", "--smoke", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = tmp_path / "attention_cpu_smoke"
    report = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    for png in (tmp_path / "attention_cpu_smoke.png", tmp_path / "attention_cpu_smoke_memory.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["machine"]["cpu_model"] in md and report["machine"]["date"] in md
    assert report["methods"] == list(METHODS) and len(report["cases"]) == 2
    for case in report["cases"]:
        tol = 1e-4 if case["case"]["dtype"] == "fp32" else 5e-2
        assert set(case["methods"]) == set(METHODS)
        for name, r in case["methods"].items():
            if r["status"] == "ok":
                assert r["median_ms"] > 0 and r["gflops"] > 0
                assert r["max_abs_err"] <= tol, (case["name"], name, r["max_abs_err"])
            else:
                assert r["reason"], (case["name"], name)
        for name in ("eager", "op", "compiled_fa", "sdpa_mask"):
            assert case["methods"][name]["status"] == "ok", (case["name"], name, case["methods"][name])
        assert case["methods"]["compiled_fa"]["fused"]
        rows = [line for line in md.splitlines() if line.startswith(f"| {case['name']} |")]
        assert rows and all(cell.strip() for cell in rows[0].strip("|").split("|"))
        assert len(rows[0].strip("|").split("|")) == 1 + len(METHODS) + 2  # case, peers, two ratios
    (mem,) = report["memory"]
    assert set(mem["methods"]) == set(METHODS)
    assert mem["methods"]["op"]["status"] == "ok" and mem["methods"]["op"]["total_mib"] > 0
