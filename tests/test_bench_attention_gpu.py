"""benchmarks/bench_attention_gpu.py end to end without a GPU: ``--smoke`` on CPU tensors.

The smoke run goes through the whole pipeline the GPU run uses (every method, the correctness
check, failure recording, JSON / markdown / plot), with the Triton kernel in Triton's
interpreter. Also: the correctness check flags a wrong result, and without CUDA the script
refuses to pretend it measured a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import attention_gpu_cases as cases
from benchmarks import attention_gpu_report as report_md
from benchmarks import bench_attention_gpu as bench

REPO = Path(__file__).resolve().parents[1]
# Methods the smoke run must measure: the rest may fail on CPU, but must say why.
MEASURED_ON_CPU = ("fa_dynamo_triton", "fa_dynamo_auto", "sdpa_flash", "sdpa_math")
SMOKE_ARGS = ["--smoke", "--gqa", "2"]  # GQA exercises every method's grouped-heads path too


def _bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_attention_gpu", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    proc = _bench(*SMOKE_ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def test_smoke_writes_every_case_and_method(smoke):
    out, proc = smoke
    report = json.loads((out / "attention_gpu_smoke-cpu.json").read_text())
    args = bench.parse_args(SMOKE_ARGS + ["--out", str(out)])
    expected = cases.matrix(args.lengths, args.head_dims, args.masks, args.passes, args.tokens, args.model_dim, args.gqa)
    assert sorted(report["cases"]) == sorted(c.key for c in expected)
    assert report["methods"] == list(bench.METHODS)
    for case in expected:
        row = report["cases"][case.key]
        assert row["case"]["kv_heads"] * 2 == row["case"]["heads"]
        for method in bench.METHODS:
            result = row["results"][method]
            if "error" in result:
                assert method not in MEASURED_ON_CPU, f"{case.key} {method}: {result['error']}"
                assert isinstance(result["error"], str) and result["error"].strip()
            else:
                assert result["ms"] > 0 and math.isfinite(result["ms"])
                assert result["tflops"] == pytest.approx(case.flop / (result["ms"] * 1e-3) / 1e12, rel=1e-9)


def test_smoke_correctness_checks_pass_for_every_measured_method(smoke):
    out, _ = smoke
    report = json.loads((out / "attention_gpu_smoke-cpu.json").read_text())
    first = min(row["case"]["seq_len"] for row in report["cases"].values())
    checked = 0
    for key, row in report["cases"].items():
        for method, result in row["results"].items():
            if row["case"]["seq_len"] == first and "error" not in result:
                check = result["check"]
                tensors = 4 if row["case"]["pass_name"] == "fwd_bwd" else 1
                assert check["ok"] is True, (key, method, check)
                assert len(check["errors"]) == tensors
                checked += 1
            else:
                assert "check" not in result
    assert checked >= len(MEASURED_ON_CPU) * 8  # 8 configurations (2 head dims × 2 masks × 2 passes)


def test_smoke_markdown_and_plot(smoke):
    out, proc = smoke
    md = (out / "attention_gpu_smoke-cpu.md").read_text()
    assert "SMOKE RUN on CPU" in md and f"torch {torch.__version__}" in md
    for label in report_md.LABELS.values():
        assert f" {label} |" in md
    assert "**FAIL**" not in md and " ✗ |" not in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "attention_gpu_smoke-cpu.png").stat().st_size > 10_000
    else:
        assert "matplotlib is not installed" in proc.stderr


def test_check_flags_a_wrong_result():
    torch.manual_seed(0)
    case = cases.Case(seq_len=33, head_dim=16, causal=True, pass_name="fwd_bwd", batch=2, heads=4, kv_heads=2)
    inputs, dout = bench.make_inputs(case, torch.bfloat16, torch.device("cpu"))
    reference = bench.math_outputs(case, inputs, dout, torch.float64)
    baseline = bench.math_outputs(case, inputs, dout, torch.bfloat16)
    assert bench.compare(baseline, reference, baseline, torch.bfloat16)["ok"]
    not_causal = dataclasses.replace(case, causal=False)
    wrong = bench.math_outputs(not_causal, inputs, dout, torch.bfloat16)
    check = bench.compare(wrong, reference, baseline, torch.bfloat16)
    assert not check["ok"] and check["errors"]["out"]["max_err"] > check["errors"]["out"]["tol"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_without_cuda_it_refuses(tmp_path):
    proc = _bench("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device: no GPU figures measured" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_fa_dynamo_fallback_is_a_failure_not_a_number():
    """A kernel that hands the call to another kernel must not be reported under its own name."""
    case = cases.Case(seq_len=32, head_dim=16, causal=True, pass_name="fwd", batch=1, heads=2, kv_heads=2)
    inputs, dout = bench.make_inputs(case, torch.float32, torch.device("cpu"))
    xformers_on_cpu = bench._fa_dynamo("xformers")  # fa_dynamo serves this with its CPU kernel, and says so
    for _ in range(2):  # fa_dynamo says each fallback once per process: the second case must see it too
        result = bench.measure_method(xformers_on_cpu, case, inputs, dout, bench.cpu_timer, smoke=True)
        assert set(result) == {"error"} and result["error"].startswith("fa_dynamo fell back: ")
        assert "xformers kernel serves CUDA tensors only" in result["error"]


@pytest.mark.parametrize("pass_name", cases.PASSES)
def test_xformers_layout_against_a_fake(fake_xformers, pass_name):
    """Real xformers has no CPU operator: its BMHK / BMGHK (GQA) call is checked on the documented fake."""
    case = cases.Case(seq_len=40, head_dim=16, causal=True, pass_name=pass_name, batch=2, heads=6, kv_heads=2)
    inputs, dout = bench.make_inputs(case, torch.float32, torch.device("cpu"))
    reference = (bench.math_outputs(case, inputs, dout, torch.float64), bench.math_outputs(case, inputs, dout, torch.float32))
    result = bench.measure_method(bench.METHODS["xformers"], case, inputs, dout, bench.cpu_timer, True, reference)
    assert result["check"]["ok"], result
    assert result["tflops"] > 0
    call = fake_xformers[0]
    assert call["query"].shape == (2, 40, 2, 3, 16) and call["key"].shape == (2, 40, 2, 3, 16)  # BMGHK
    assert type(call["attn_bias"]).__name__ == "LowerTriangularMask"
