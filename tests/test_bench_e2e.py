"""The end-to-end benchmark (benchmarks/bench_e2e_cpu.py, e2e_models.py, e2e_report.py): a smoke run on tiny models, and its budget and targets logic."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_e2e_cpu as e2e
from benchmarks import e2e_models, e2e_report

SMOKE_MODELS = ("llama", "bert")  # a decoder (GQA, decode with a cache) and an encoder
SMOKE_CONFIGS = ("eager", "sdpa", "fa_eager")  # Inductor's C++ compiles would not fit the smoke test's time


def _measured_or_recorded(cell: dict) -> bool:
    """A case is accounted for: a number, or a recorded skip / failure with its reason."""
    return any(isinstance(cell.get(k), float) for k in ("median_ms", "tokens_per_s", "peak_mib")) or bool(
        cell.get("skipped") or cell.get("error")
    )


def test_smoke_run_writes_every_case(tmp_path):
    argv = ["--tiny", "--models", ",".join(SMOKE_MODELS), "--configs", ",".join(SMOKE_CONFIGS),
            "--out-dir", str(tmp_path), "--budget-min", "10"]
    assert e2e.main(argv) == 0
    report = json.loads((tmp_path / "e2e_cpu.json").read_text())
    text = (tmp_path / "e2e_cpu.md").read_text()
    assert (tmp_path / "e2e_cpu.png").stat().st_size > 0
    machine = report["machine"]
    for key in ("cpu_model", "cores", "torch", "date"):
        assert machine[key]
    assert machine["cpu_model"] in text and machine["torch"] in text and machine["date"] in text

    assert [f["family"] for f in report["families"]] == list(SMOKE_MODELS)
    for fam in report["families"]:
        assert [p["length"] for p in fam["prefill"]] == list(e2e_models.TINY.lengths)
        for p in fam["prefill"]:
            assert set(p["configs"]) == set(SMOKE_CONFIGS)
            assert all(_measured_or_recorded(c) for c in p["configs"].values()), p
            # nothing is skipped at this size, and the compiled model matches eager
            for name in ("sdpa", "fa_eager"):
                cell = p["configs"][name]
                assert cell["diff_vs"] == "eager" and cell["outputs_ok"] is True, cell
        first = fam["prefill"][0]["configs"]["fa_eager"]
        assert first["graphs_compiled"] >= 1
        assert first["fa_sites"]["fused"] == first["fa_sites"]["candidates"] == e2e_models.TINY.layers
        assert fam["prefill"][1]["configs"]["fa_eager"]["graphs_compiled"] == 0  # dynamic length, no recompile
        assert set(fam["memory"]) == set(SMOKE_CONFIGS)
        for mem in fam["memory"].values():
            assert set(mem) == {str(n) for n in e2e_models.TINY.lengths}
            assert all(_measured_or_recorded(c) for c in mem.values()), mem

    llama, bert = report["families"]
    assert bert["decode"] is None
    decode = llama["decode"]["configs"]
    assert set(decode) == set(SMOKE_CONFIGS)
    for name in ("sdpa", "fa_eager"):
        assert decode[name]["outputs_ok"] is True and decode[name]["same_tokens"] is True
        assert decode[name]["graphs_compiled_timed_run"] == 0
    assert decode["fa_eager"]["fa_sites"]["fused"] == e2e_models.TINY.layers

    assert {(t["family"], t["length"]) for t in report["targets"]} == {
        (f, n) for f in SMOKE_MODELS for n in e2e_models.TINY.lengths
    }
    assert "## Targets" in text and "## Decode" in text and "## Peak memory" in text


def test_budget_extrapolates_and_skips():
    budget = e2e.Budget(minutes=60, case_cap_s=100)
    assert budget.predict_call_s("m", "eager", 8192) is None
    assert budget.skip_reason("m", "eager", 8192, calls=4) is None  # nothing to extrapolate from: run it
    budget.record("m", "eager", 512, 0.5)
    assert budget.predict_call_s("m", "eager", 1024) == pytest.approx(2.0)  # one point: quadratic
    budget.record("m", "eager", 2048, 3.0)  # exponent log(6)/log(4) ≈ 1.29 between the two points
    p = 1.2924812503605781
    assert budget.predict_call_s("m", "eager", 8192) == pytest.approx(3.0 * 4**p)
    budget.record("m", "sdpa", 512, 0.4)
    budget.record("m", "sdpa", 2048, 0.5)  # sub-linear growth is clipped to linear
    assert budget.predict_call_s("m", "sdpa", 8192) == pytest.approx(2.0)
    budget.record("m", "slow", 512, 10.0)
    reason = budget.skip_reason("m", "slow", 2048, calls=4)  # 160 s per call predicted
    assert reason.startswith("skipped: over budget") and "640 s" in reason
    spent = e2e.Budget(minutes=0, case_cap_s=100)
    assert spent.skip_reason("m", "eager", 512, calls=1).startswith("skipped: over budget")


def test_targets_say_by_how_much_they_are_missed():
    def cell(ms, compile_s=None):
        return {"median_ms": ms} if compile_s is None else {"median_ms": ms, "compile_s": compile_s}

    configs = {"eager": cell(130.0), "inductor": cell(100.0, 20.0), "fa_eager": cell(125.0, 5.0),
               "fa_inductor": cell(80.0, 25.0)}
    for name, row in configs.items():
        row["speedup_vs_eager"] = 130.0 / row["median_ms"]
        row["speedup_vs_inductor"] = 100.0 / row["median_ms"]
    report = {"families": [{"family": "llama", "prefill": [{"length": 2048, "configs": configs}]}]}
    rows = {t["config"]: t for t in e2e_report.targets(report)}
    assert rows["fa_inductor"]["vs_eager_status"] == "met" and rows["fa_inductor"]["vs_inductor_status"] == "met"
    # 1.04× eager against a 1.3× target: 20% short; 0.8× Inductor against 1.0×: 20% short
    assert rows["fa_eager"]["vs_eager_status"] == "missed by 20%"
    assert rows["fa_eager"]["vs_inductor_status"] == "missed by 20%"
    assert rows["fa_inductor"]["compile_s"] == 25.0 and rows["fa_inductor"]["inductor_compile_s"] == 20.0
    assert e2e_report.fa_missed(report["families"][0]["prefill"][0]) == "fa_eager"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        e2e.parse_args(["--models", "llama,t5"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--lengths", "1"])
    with pytest.raises(ValueError, match="unknown model family"):
        e2e_models.build_model("t5", e2e_models.TINY, "eager")
