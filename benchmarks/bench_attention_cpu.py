"""Op-level CPU benchmark: fa_dynamo's attention against every CPU peer, in one run.

    python -m benchmarks op            # default grid: ~26 min on 2 idle cores (see below)
    python -m benchmarks op --quick    # ~3 min: short lengths, every mask and dtype
    python -m benchmarks op --full     # the whole cross product at 512…16384 (~2 h)
    python -m benchmarks op --smoke    # ~25 s: two tiny cases, for the test suite

(``python -m benchmarks.bench_attention_cpu`` is the same.) A progress bar counts cases.

**Peers**, timed round-robin (``benchmarks.timing.measure_interleaved``) on the same q/k/v:

* ``eager``       — Hugging Face's eager attention: ``q @ kᵀ · scale`` + an additive float mask
  (``finfo.min`` where hidden, prebuilt as a model builds it once per forward), softmax in fp32,
  ``@ v``; ``repeat_kv`` copies K/V for GQA.
* ``sdpa``        — ``F.scaled_dot_product_attention`` with ``is_causal=True`` (causal) or no mask
  (none), held to the FLASH_ATTENTION backend (``sdpa_kernel``): ATen's CPU flash kernel, which
  skips the hidden blocks. It cannot express a window or a padding mask (recorded as n/a).
* ``sdpa_mask``   — SDPA with an explicit boolean mask ``[B, 1, S, S]`` (HF's sdpa path), held to
  the FLASH_ATTENTION backend too (the CPU flash kernel, over all S² scores).
* ``sdpa_math``   — SDPA forced to the MATH backend (``sdpa_kernel``), ``is_causal`` where possible.
* ``op``          — ``fa_dynamo.attention`` with the band (and the key-padding row as a mask).
* ``compiled_fa`` — ``torch.compile(fn, backend="fastattention")``, ``fn`` the eager code with its
  mask built inside (``triu`` / ``arange`` comparisons / ``masked_fill`` by the padding row).
* ``inductor``    — the same ``fn`` under ``torch.compile`` (Inductor).
* ``flex``        — ``torch.compile(flex_attention)`` with a ``BlockMask`` from the mask's
  ``mask_mod`` (``enable_gqa`` for GQA).

**Axes**: lengths 512…16384; head dim 64/128; masks causal / none / padding (batch 2, the last
25% of row 1's keys padded, causal) / window (w = min(1024, S/4), causal); fp32 / bf16; MHA
(8 heads) / GQA (8 q heads, 2 kv heads). Batch 1 except padding.

**Grids**: ``--full`` is the cross product. The default runs the cross product at 512 and 1024
tokens (64 cases) and the headline slice (causal and window × MHA and GQA, fp32, d 64) at
2048…16384 (16 cases), then peak memory at 8192 and 32768 tokens. Estimated run time on 2 idle
cores, from the per-method rates of the last quiet run (eager ~41 dense GFLOP/s, SDPA and the op
~140, Inductor ~78, SDPA with a mask ~145) and the compile times measured here (flex ~4 s,
Inductor ~2 s, fastattention ~0.5 s per case): short cases ~10 min, the long slice ~12 min (a
8192-token case ~60 s with eager and SDPA-math included; at 16384 eager / SDPA-math exceed the
RAM and Inductor the call budget), memory ~3 min — about 26 minutes, within 35 under light load.
``--quick`` (18 cases at 512…2048, memory at 2048): ~3 min idle; measured 11 min wall, 3.2 min
CPU, with other processes keeping 1.7 of the 2 cores busy. ``--smoke``: ~25 s idle.

**Budgets**: a call is skipped, and recorded as skipped with the reason, when its predicted
time exceeds ``--call-budget-s`` (scaled from the same method's median at the previous length
of the same series by the FLOPs the method does: all S² scores for eager / sdpa_mask /
sdpa_math / inductor, only the visible ones for the rest), or its predicted memory exceeds
80% of the available RAM. Defaults: 5 s per call (quick 1 s, smoke 0.5 s), 30 s per call in the
memory runs; no prediction beyond 64× the measured work (``plan``). Timed rounds per case
shrink (≥ 3) to fit ``--case-budget-s`` (default 40 s).

**Metrics**: median and min ms; GFLOP/s of *useful* work, 4·H·D·(visible (query, key) pairs,
counted exactly over the batch), the same count for every method; the same divided by the
dtype's measured ``torch.mm`` rate (``timing.matmul_ceiling``); max |Δ| against the first of
sdpa / sdpa_mask / eager that ran. Peak memory: one fresh process, one fork per method
(``peak_memory.run_forked``): after a warm-up call (which compiles), the peak-RSS mark is reset, one call
runs, peak = ``ru_maxrss`` − RSS before it.

**Results** (``--out``, default ``benchmarks/results/``; ``_quick`` / ``_smoke`` stems for those
grids): ``attention_cpu.json``, ``.md``, ``.png`` (time vs length per mask × dtype) and
``_memory.png``; each names the machine (CPU, cores, torch) and the date. JSON schema
(``"schema": "attention_cpu/2"``)::

    machine, command, settings, ceiling{dtype: {gflops, n, median_s}}, methods[], load, total_s,
    cases[]: {name, description, case{seq, mask, dtype, head_dim, heads, kv_heads}, batch, window,
              flops, dense_flops, reference, repeats, other_processes_cores_avg,
              methods{m: {status: "ok", median_ms, min_ms, samples_ms, gflops, ceiling_fraction,
                          max_abs_err, speedup_vs_sdpa, speedup_vs_eager, compile_s?, fused?}
                       | {status: "skipped" | "n/a" | "oom" | "unsupported" | "error", reason}}}
    memory[]: {seq, heads, head_dim, inputs_mib, methods{m: {status: "ok", peak_above_baseline_mib,
               first_call_peak_mib, total_mib, call_s} | {status, reason}}}
    targets[]: {target, measured, required, met, detail}
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from benchmarks.attention_cpu_cases import COMPILED, DTYPES, METHODS, Case, grid
from benchmarks.attention_cpu_methods import NOT_APPLICABLE, build_methods, failure, make_inputs
from benchmarks.attention_cpu_report import markdown, plot, targets
from benchmarks.peak_memory import available_bytes, maxrss_mib, reset_peak, rss_mib, run_forked
from benchmarks.report_writing import command_line, write_report
from benchmarks.timing import (
    CpuLoad,
    describe_machine,
    machine_info,
    matmul_ceiling,
    measure_interleaved,
    over_budget,
    predict_seconds,
)

RESULTS = Path(__file__).resolve().parent / "results"
MiB, GiB = 1024**2, 1024**3

# --- feasibility: what a call will cost before it runs -----------------------------------------


def predicted_bytes(method: str, case: Case) -> float:
    """Memory one call needs beyond its inputs, roughly; O(S) methods count as 0.

    eager and SDPA-math hold about three B·H·S² fp32 score-sized tensors at once (scores, masked
    scores, probabilities) plus the S² mask; Inductor (measured) about two; SDPA with a mask
    holds the bool mask and the float mask ATen converts it to.
    """
    s2 = case.batch * case.seq * case.seq
    elt = DTYPES[case.dtype].itemsize
    if method in ("eager", "sdpa_math"):
        return 3 * case.heads * s2 * 4 + s2 * elt
    if method == "inductor":
        return 2 * case.heads * s2 * 4
    if method == "sdpa_mask":
        return s2 * (1 + elt)
    return 0.0


MAX_EXTRAPOLATION = 64.0  # three doublings of the length for a dense method


def plan(method: str, case: Case, history: dict, budget_s: Optional[float], avail: Optional[float]) -> Optional[dict]:
    """A skip result for ``method`` on ``case``, or None to run it.

    ``history[(series, method)] = (work, seconds)``: the method's last measured call in the
    same series, scaled to this case by the FLOPs it does (``Case.work``). Only up to
    ``MAX_EXTRAPOLATION``× its work: from much smaller calls per-call overheads dominate and a
    linear scale-up overestimates wildly, so such a call runs unpredicted (RAM still guards it).
    """
    if (method, case.mask) in NOT_APPLICABLE:
        return None  # build_methods records why
    need = predicted_bytes(method, case)
    if avail is not None and need > 0.8 * avail:
        return {"status": "skipped", "reason": f"exceeds RAM (predicted {need / GiB:.1f} GiB > 80% of "
                f"{avail / GiB:.1f} GiB available)", "predicted_gib": need / GiB}
    last = history.get((case.series, method))
    if last is None or case.work(method) > MAX_EXTRAPOLATION * last[0]:
        return None
    predicted = predict_seconds(last[1], last[0], case.work(method))
    reason = over_budget(predicted, budget_s)
    return None if reason is None else {"status": "skipped", "reason": reason, "predicted_s": predicted}


# --- timing ------------------------------------------------------------------------------------


def run_case(case: Case, methods: tuple[str, ...], history: dict, budget_s: Optional[float],
             case_budget_s: float, repeats: int, ceiling: dict) -> dict:
    """Time every method on one case; every method ends with a status (and a reason if not ok)."""
    avail = available_bytes()
    skips = {m: s for m in methods if (s := plan(m, case, history, budget_s, avail))}
    q, k, v = make_inputs(case)
    fns, results = build_methods(case, q, k, v, tuple(m for m in methods if m not in skips))
    results.update(skips)
    outputs = {}
    for name in list(fns):  # a first call: catches failures before timing, gives the outputs
        try:
            outputs[name] = fns[name]().float()
        except Exception as e:
            results[name] = {**results.get(name, {}), **failure(e)}
            del fns[name]
    ref_name = next((m for m in ("sdpa", "sdpa_mask", "eager", "sdpa_math") if m in outputs), next(iter(outputs), None))
    errors = {m: float((o - outputs[ref_name]).abs().max()) for m, o in outputs.items()}
    del outputs
    gc.collect()
    with CpuLoad() as load:
        timings = measure_interleaved(fns, warmup=1, repeats=repeats, budget_s=case_budget_s) if fns else {}
    for name, t in timings.items():
        history[(case.series, name)] = (case.work(name), t.median)
        gflops = case.flops / t.median / 1e9
        results[name] = {
            "status": "ok",
            "median_ms": t.median * 1e3,
            "min_ms": t.min * 1e3,
            "samples_ms": [x * 1e3 for x in t.samples],
            "gflops": gflops,
            "ceiling_fraction": gflops / ceiling[case.dtype]["gflops"],
            "max_abs_err": errors[name],
            **{k_: v_ for k_, v_ in results.get(name, {}).items() if k_ in ("compile_s", "fused")},
        }
    base = _sdpa_peer(results)
    for row in results.values():
        if row["status"] == "ok":
            if base:
                row["speedup_vs_sdpa"] = base["median_ms"] / row["median_ms"]
            if results.get("eager", {}).get("status") == "ok":
                row["speedup_vs_eager"] = results["eager"]["median_ms"] / row["median_ms"]
    del fns
    torch._dynamo.reset()
    gc.collect()
    return {
        "name": case.name,
        "description": case.describe(),
        "case": asdict(case),
        "batch": case.batch,
        "window": case.window,
        "flops": case.flops,
        "dense_flops": case.dense_flops,
        "reference": ref_name,
        "repeats": len(next(iter(timings.values())).samples) if timings else 0,
        "other_processes_cores_avg": load.others_cores,
        "methods": {m: results[m] for m in methods},
    }


def _sdpa_peer(results: dict) -> Optional[dict]:
    """SDPA's CPU flash kernel as the case can call it: is_causal / unmasked, else with the mask."""
    for name in ("sdpa", "sdpa_mask"):
        if results.get(name, {}).get("status") == "ok":
            return results[name]
    return None


# --- memory ------------------------------------------------------------------------------------


def memory_worker(method: str, case: Case) -> dict:
    """In its own process: peak RSS of one call of ``method`` on ``case`` (after a warm-up)."""
    q, k, v = make_inputs(case)
    gc.collect()
    base_first = rss_mib()
    fns, notes = build_methods(case, q, k, v, (method,))  # compiles and runs the compiled ones once
    if method not in fns:
        return notes[method]
    try:
        fns[method]()
    except Exception as e:
        return failure(e)
    first_peak = maxrss_mib() - base_first
    gc.collect()
    reset = reset_peak()
    base = rss_mib()
    t0 = time.perf_counter()
    fns[method]()
    call_s = time.perf_counter() - t0
    return {
        "status": "ok",
        "peak_above_baseline_mib": max(0.0, maxrss_mib() - base),
        "first_call_peak_mib": max(0.0, first_peak),
        "call_s": call_s,
        "peak_reset": reset,
    }


def run_memory(seq: int, methods: tuple[str, ...], history: dict, budget_s: float, skip: dict) -> dict:
    """Peak memory of each method at ``seq`` tokens, causal, fp32, 8 heads × 64, one fork each.

    A method is skipped when its predicted memory exceeds the RAM or its predicted call time
    (from the timing cases of the same series) exceeds ``budget_s``.
    """
    case = Case(seq)
    inputs_mib = 3 * case.heads * seq * case.head_dim * 4 / MiB
    out: dict = {"seq": seq, "heads": case.heads, "head_dim": case.head_dim, "mask": "causal", "dtype": "fp32",
                 "inputs_mib": inputs_mib, "output_mib": inputs_mib / 3, "methods": {}}
    avail = available_bytes()
    todo = []
    for m in methods:
        out["methods"][m] = skip.get(m) or plan(m, case, history, budget_s, avail)
        if out["methods"][m] is None:
            todo.append(m)
    if todo:
        cmd = [sys.executable, "-m", "benchmarks.bench_attention_cpu", "--memory-worker", ",".join(todo),
               "--memory-seq", str(seq), "--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        lines = proc.stdout.strip().splitlines()
        results = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        for m in todo:
            r = results.get(m) or {"error": reason}
            out["methods"][m] = {"status": "error", "reason": r["error"]} if "error" in r else r
    for r in out["methods"].values():
        if r.get("status") == "ok":
            r["total_mib"] = inputs_mib + r["peak_above_baseline_mib"]
    return out


# --- main --------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m benchmarks op", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short lengths, every mask and dtype (~3 min)")
    size.add_argument("--full", action="store_true", help="the whole cross product (~2 h)")
    size.add_argument("--smoke", action="store_true", help="two tiny cases and memory at 512 tokens (< 1 min)")
    p.add_argument("--lengths", help="comma-separated: keep only cases of these lengths")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--call-budget-s", type=float, default=None, help="skip calls predicted slower (default 5, quick 1, smoke 0.5)")
    p.add_argument("--case-budget-s", type=float, default=None, help="timed rounds per case (default 40, quick 5, smoke 2)")
    p.add_argument("--memory-budget-s", type=float, default=None, help="memory runs: skip calls predicted slower (default 30)")
    p.add_argument("--memory-seqs", help="comma-separated lengths of the memory runs (default 8192,32768; quick 2048)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 9, quick/smoke 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, = cores)")
    p.add_argument("--out", "--out-dir", dest="out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--memory-seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        methods = args.memory_worker.split(",")
        print(json.dumps({m: run_forked(memory_worker, m, Case(args.memory_seq)) for m in methods}))
        return 0

    kind = "full" if args.full else "quick" if args.quick else "smoke" if args.smoke else "default"
    small = kind in ("quick", "smoke")
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    cases = grid(kind)
    if args.lengths:
        keep = {int(x) for x in args.lengths.split(",")}
        cases = [c for c in cases if c.seq in keep]
        if not cases:
            p.error(f"no case of the {kind} grid has a length in {sorted(keep)}")
    call_budget = args.call_budget_s or {"smoke": 0.5, "quick": 1.0}.get(kind, 5.0)
    case_budget = args.case_budget_s or {"smoke": 2.0, "quick": 5.0}.get(kind, 40.0)
    memory_budget = args.memory_budget_s or 30.0
    repeats = args.repeats or (3 if small else 9)
    mem_seqs = [] if args.no_memory else [int(x) for x in (args.memory_seqs or {"smoke": "512", "quick": "2048"}.get(kind, "8192,32768")).split(",")]
    stem = "attention_cpu" + ("" if kind in ("default", "full") else f"_{kind}")
    command = command_line("python -m benchmarks op", sys.argv[1:] if argv is None else argv)

    torch._dynamo.config.cache_size_limit = 64
    report: dict = {
        "schema": "attention_cpu/2", "machine": machine_info(), "command": command, "stem": stem,
        "settings": {"grid": kind, "call_budget_s": call_budget, "case_budget_s": case_budget,
                     "memory_budget_s": memory_budget, "repeats": repeats, "memory_seqs": mem_seqs},
        "methods": list(methods), "cases": [], "memory": [],
    }
    print(describe_machine(report["machine"]), file=sys.stderr, flush=True)
    report["ceiling"] = matmul_ceiling(tuple(sorted({c.dtype for c in cases} | {"fp32"})))
    history: dict = {}
    t_start = time.perf_counter()
    bar = tqdm(total=len(cases) + len(mem_seqs), desc="op suite", unit="case", file=sys.stderr)
    with CpuLoad() as load:
        for case in cases:
            bar.set_postfix_str(case.name)
            result = run_case(case, methods, history, call_budget, case_budget, repeats, report["ceiling"])
            report["cases"].append(result)
            bar.write("  ".join([case.name] + [
                f"{m} {r['median_ms']:.1f}ms" if r["status"] == "ok" else f"{m} {r['status']}"
                for m, r in result["methods"].items()]), file=sys.stderr)
            bar.update()
        for seq in mem_seqs:
            bar.set_postfix_str(f"memory {seq}")
            skip = {m: {"status": "skipped", "reason": "not measured with --smoke"} for m in COMPILED} if kind == "smoke" else {}
            mem = run_memory(seq, methods, history, memory_budget, skip)
            report["memory"].append(mem)
            bar.write(f"memory {seq}: " + "  ".join(
                f"{m} {r['total_mib']:.0f}MiB" if r["status"] == "ok" else f"{m} {r['status']}" for m, r in mem["methods"].items()),
                file=sys.stderr)
            bar.update()
    bar.close()
    report["load"] = load.as_dict()
    report["total_s"] = time.perf_counter() - t_start
    report["targets"] = targets(report)

    write_report(args.out / stem, report, markdown(report))
    plot(report, args.out)
    for t in report["targets"]:
        print(f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}: {t['target']}: {t['detail'][:120]}")
    print(f"wrote {args.out}/{stem}.{{json,md,png}} and {stem}_memory.png in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
