"""End-to-end CPU benchmark: transformers models with eager attention, SDPA, Inductor and fastattention.

    python -m benchmarks e2e                      # full run (= python -m benchmarks.bench_e2e_cpu)
    python -m benchmarks e2e --quick              # Llama and BERT only, smaller, shorter
    python -m benchmarks e2e --models llama --lengths 512,2048 --no-memory

Run time on 2 idle cores (an estimate: no full run has been made yet; every run records its own
time): about 25-30 minutes. Compiles ~7 min (Inductor took 20 s for a 4-layer model's prefill
graph on a lightly loaded machine; one prefill and one decode graph per compiled configuration,
3 compiled configurations, 4 models); 8192-token prefills ~11 min (first call + 3 timed rounds of
5 configurations, from FLOP counts at ~80 GFLOP/s: eager ~13 s, Inductor ~11 s, SDPA and
fastattention ~6 s per call); memory workers ~6 min; the rest ~2 min. ``--budget-min`` (default 28)
bounds it: a case whose predicted time does not fit the time left is recorded as
``skipped: over budget`` rather than dropped. ``--quick`` (Llama and BERT, hidden 256, 2 layers) took
6 min with other processes keeping 1.65 of the 2 cores busy (130 CPU-seconds): ~3 min on idle cores.

Models (built from configs, random weights, seed 0, eval mode, fp32, batch 1, random token ids;
nothing is downloaded). Full size: 4 layers, hidden 512, 8 heads × 64, vocabulary 32000:

* ``llama``   — GQA 8 query / 2 key-value heads, MLP 1408, rotary;
* ``mistral`` — the same with ``sliding_window=1024``, shorter than the 2048/8192 prefills;
* ``gpt2``    — ``n_positions=8192``, MLP 2048, learned positions;
* ``bert``    — ``max_position_embeddings=8192``; an encoder: its "prefill" is one forward pass, no decode.

Configurations (every one built from the same weights):

* ``eager``         — ``attn_implementation="eager"``, uncompiled (the baseline of the targets);
* ``sdpa``          — ``attn_implementation="sdpa"``, uncompiled;
* ``inductor``      — the eager-attention model under ``torch.compile`` (Inductor);
* ``fa_eager``      — the eager-attention model under ``torch.compile(backend=FastAttentionBackend({"inner": "eager"}))``;
* ``fa_inductor``   — the same with ``{"inner": "inductor"}`` (the default inner compiler);
* ``sdpa_inductor`` — the SDPA model under Inductor (only with ``--configs``).

Prefill: one forward pass over L tokens (decoders: ``use_cache=False, logits_to_keep=1``, as
generation's prefill computes logits for the last token only; BERT: the last hidden state).
The sequence dim is marked dynamic (``maybe_mark_dynamic``) so one compiled graph serves every
length. Per length: a first call (it compiles; its output is compared with eager's), then timed
calls with the configurations interleaved round-robin (``benchmarks.timing.measure_interleaved``).
Compile time = first call − median; graphs compiled = Dynamo's ``unique_graphs`` counter over the call.

Decode: an uncompiled prefill of P tokens fills a ``DynamicCache`` (its tensors marked dynamic),
then N one-token steps through the configuration's callable, fed the tokens eager's greedy run
chose (teacher forcing, so every configuration's logits are comparable step by step). Run twice:
the first compiles, the second is timed (tokens/s = N / decode time).

Peak memory: one process per (model, configuration) — a subprocess per model that imports torch
once and forks a child per configuration (``peak_memory.run_forked``), so each child's
``ru_maxrss`` is its own. After a compiling call at the shortest length the peak-RSS mark is
reset before each prefill; the peak is ``ru_maxrss`` minus the RSS before the call.

Results: ``benchmarks/results/e2e_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.e2e_models import (
    CONFIGS,
    DEFAULT_CONFIGS,
    ENCODERS,
    FA_CONFIGS,
    FAMILIES,
    FULL,
    QUICK,
    QUICK_MODELS,
    TINY,
    Plan,
    Runner,
    build_runners,
    graphs_compiled,
    token_ids,
)
from benchmarks.e2e_report import fa_missed, markdown, plot, targets
from benchmarks.failures import error_line
from benchmarks.peak_memory import available_bytes, maxrss_mib, reset_peak, rss_mib, run_forked
from benchmarks.report_writing import command_line, write_report
from benchmarks.timing import CpuLoad, describe_machine, machine_info, measure_interleaved, predict_seconds

RESULTS = Path(__file__).resolve().parent / "results"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")


def tolerance(ref: torch.Tensor, rel: float) -> float:
    """Allowed max abs diff: ``rel`` × the reference's largest magnitude (at least ``rel``)."""
    return rel * max(1.0, float(ref.abs().max()))


def _error(e: BaseException) -> str:
    return error_line(e)[:300]


# --- the time budget ---------------------------------------------------------------------------


class Budget:
    """Predicts a case's time from the same configuration at shorter lengths; skips what won't fit."""

    def __init__(self, minutes: float, case_cap_s: float):
        self.deadline = time.perf_counter() + 60 * minutes
        self.case_cap_s = case_cap_s
        self.seen: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, family: str, config: str, length: int, seconds: float) -> None:
        self.seen.setdefault((family, config), []).append((length, seconds))

    def predict_call_s(self, family: str, config: str, length: int) -> Optional[float]:
        """Per-call seconds, extrapolated with the exponent of the last two lengths (1..2; 2 with one)."""
        pts = sorted(self.seen.get((family, config), []))
        if not pts:
            return None
        (l2, t2) = pts[-1]
        p = 2.0
        if len(pts) > 1 and pts[-2][0] < l2:
            l1, t1 = pts[-2]
            p = min(2.0, max(1.0, math.log(t2 / t1) / math.log(l2 / l1)))
        return predict_seconds(t2, l2**p, length**p)  # time ∝ length**p

    def skip_reason(self, family: str, config: str, length: int, calls: int) -> Optional[str]:
        left = self.left_s()
        if left <= 0:
            return "skipped: over budget (run time used up)"
        per_call = self.predict_call_s(family, config, length)
        if per_call is None:
            return None
        need = per_call * calls
        if need > min(self.case_cap_s, left):
            return f"skipped: over budget (predicted {need:.0f} s for {calls} calls; {min(self.case_cap_s, left):.0f} s allowed)"
        return None


def eager_scores_gib(plan: Plan, length: int) -> float:
    """Memory eager attention holds at once: three fp32 [heads, L, L] tensors plus the L×L mask."""
    return (3 * plan.heads + 1) * length * length * 4 / 1024**3


def memory_skip_reason(plan: Plan, config: str, length: int) -> Optional[str]:
    if CONFIGS[config].attn != "eager" or config in FA_CONFIGS:
        return None
    need, avail = eager_scores_gib(plan, length), available_bytes()
    if avail is not None and need > 0.7 * avail / 1024**3:
        return f"skipped: needs ~{need:.1f} GiB, {avail / 1024**3:.1f} GiB available"
    return None


# --- prefill -----------------------------------------------------------------------------------


def bench_prefill(family: str, runners: dict[str, Runner], plan: Plan, length: int, budget: Budget, rel_tol: float) -> dict:
    ids = token_ids(length, plan.vocab, seed=length)
    rows: dict[str, dict] = {}
    outs: dict[str, torch.Tensor] = {}
    fns: dict[str, Callable] = {}
    for name, r in runners.items():
        why = memory_skip_reason(plan, name, length) or budget.skip_reason(family, name, length, 1 + plan.repeats)
        if why:
            rows[name] = {"skipped": why}
            continue
        g0, n0 = graphs_compiled(), len(r.backend.reports) if r.backend else 0
        t0 = time.perf_counter()
        try:
            outs[name] = r.prefill(ids)
        except Exception as e:  # noqa: BLE001 — recorded, the run goes on
            rows[name] = {"error": _error(e)}
            continue
        rows[name] = {"first_call_s": time.perf_counter() - t0, "graphs_compiled": graphs_compiled() - g0}
        if r.backend and rows[name]["graphs_compiled"]:
            rows[name]["fa_sites"] = r.fused_sites(n0)
        fns[name] = (lambda r: lambda: r.prefill(ids))(r)
    ref_name = next((n for n in ("eager", "sdpa") if n in outs), None)
    for name, out in outs.items():
        if ref_name and name != ref_name:
            diff, tol = max_abs_diff(out, outs[ref_name]), tolerance(outs[ref_name], rel_tol)
            rows[name].update(diff_vs=ref_name, max_abs_diff=diff, tol=tol, outputs_ok=diff <= tol)
    del outs
    timings = measure_interleaved(fns, warmup=0, repeats=plan.repeats) if fns else {}
    for name, t in timings.items():
        row = rows[name]
        row.update(t.as_dict(), median_ms=t.median * 1e3, tokens_per_s=length / t.median)
        if row["graphs_compiled"]:
            row["compile_s"] = max(0.0, row["first_call_s"] - t.median)
        budget.record(family, name, length, t.median)
    for name, row in rows.items():
        for peer in ("eager", "inductor", "sdpa"):
            if "median_ms" in row and "median_ms" in rows.get(peer, {}):
                row[f"speedup_vs_{peer}"] = rows[peer]["median_ms"] / row["median_ms"]
    return {"length": length, "configs": rows}


# --- decode ------------------------------------------------------------------------------------


def bench_decode(family: str, runners: dict[str, Runner], plan: Plan, budget: Budget, rel_tol: float) -> dict:
    prompt = token_ids(plan.decode_prompt, plan.vocab, seed=1)
    steps = plan.decode_steps
    rows: dict[str, dict] = {}
    ref_name = next((n for n in ("eager", "sdpa") if n in runners), None)
    tokens, ref_logits = None, None
    if ref_name:
        tokens, ref_logits, _ = runners[ref_name].decode(prompt, steps)
    for name, r in runners.items():
        if budget.left_s() <= 0:
            rows[name] = {"skipped": "skipped: over budget (run time used up)"}
            continue
        g0, n0 = graphs_compiled(), len(r.backend.reports) if r.backend else 0
        try:
            _, logits, first = r.decode(prompt, steps, tokens)
            g1 = graphs_compiled()
            _, _, timed = r.decode(prompt, steps, tokens)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": _error(e)}
            continue
        row = {
            "steps": steps, "prompt": plan.decode_prompt, "step_s": timed, "tokens_per_s": steps / sum(timed),
            "median_step_ms": sorted(timed)[len(timed) // 2] * 1e3, "first_run_s": sum(first),
            "graphs_compiled": g1 - g0, "graphs_compiled_timed_run": graphs_compiled() - g1,
        }
        if r.compiled:
            row["compile_s"] = max(0.0, sum(first) - sum(timed))
        if r.backend and row["graphs_compiled"]:
            row["fa_sites"] = r.fused_sites(n0)
        if ref_logits is not None and name != ref_name:
            diff, tol = max_abs_diff(logits, ref_logits), tolerance(ref_logits, rel_tol)
            row.update(diff_vs=ref_name, max_abs_diff=diff, tol=tol, outputs_ok=diff <= tol,
                       same_tokens=bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()))
        rows[name] = row
    for row in rows.values():
        for peer in ("eager", "inductor"):
            if "tokens_per_s" in row and "tokens_per_s" in rows.get(peer, {}):
                row[f"speedup_vs_{peer}"] = row["tokens_per_s"] / rows[peer]["tokens_per_s"]
    return {"prompt": plan.decode_prompt, "steps": steps, "configs": rows}


# --- profile of a missed target ----------------------------------------------------------------


def profile_prefill(runner: Runner, plan: Plan, length: int, eager_ms: Optional[float]) -> dict:
    """One profiled prefill: top ops by self time, attention's share, and the bound it implies."""
    from torch.profiler import ProfilerActivity, profile

    ids = token_ids(length, plan.vocab, seed=length)
    runner.prefill(ids)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.prefill(ids)
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    attn_us = sum(e.cpu_time_total for e in events if e.key == "fa_dynamo::attention")
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"))
    share = attn_us / total_us
    head = f"{runner.family} {length} tokens, {runner.config.label}: "
    if not attn_us:
        return {"case": f"{runner.family} prefill {length}", "config": runner.config.label, "wall_ms": wall_ms,
                "note": head + "no fa_dynamo::attention call in the profile — the attention was not fused (see the "
                "fa sites column); the model ran its eager attention.", "attention_share": 0.0, "top_ops": _top(top, total_us)}
    note = head + (
        f"fa_dynamo::attention takes {share:.0%} of the profiled forward ({attn_us / 1e3:.0f} of "
        f"{total_us / 1e3:.0f} ms CPU); the linear layers (mm/addmm/linear) take {mm_us / total_us:.0%}."
    )
    if eager_ms is not None:
        rest_ms = wall_ms * (1 - share)
        note += (
            f" With attention free, the forward would still take ~{rest_ms:.0f} ms: at most "
            f"{eager_ms / rest_ms:.2f}× eager's {eager_ms:.0f} ms — the rest of the model bounds the end-to-end speedup."
        )
    return {
        "case": f"{runner.family} prefill {length}", "config": runner.config.label, "note": note,
        "wall_ms": wall_ms, "attention_share": share, "top_ops": _top(top, total_us),
    }


def _top(events, total_us: float) -> list[dict]:
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_us,
             "calls": e.count} for e in events]


# --- peak memory (subprocesses) ----------------------------------------------------------------


def memory_worker(family: str, config: str, plan: Plan, lengths: list[int]) -> dict:
    """Runs in a forked child of the family's worker process: peak RSS of one prefill per length."""
    runner = build_runners(family, plan, (config,))[config]
    runner.prefill(token_ids(min(lengths), plan.vocab, seed=min(lengths)))  # compiles
    out = {}
    for length in lengths:
        ids = token_ids(length, plan.vocab, seed=length)
        gc.collect()
        reset, base, g0 = reset_peak(), rss_mib(), graphs_compiled()
        runner.prefill(ids)
        out[str(length)] = {"peak_mib": maxrss_mib() - base, "baseline_mib": base, "peak_reset": reset,
                            "includes_compile": graphs_compiled() > g0}
    return out


def run_memory(family: str, lengths: dict[str, list[int]], plan_args: list[str], budget: Budget) -> dict:
    """One subprocess for the family (torch imported once), forked once per configuration."""
    spec = json.dumps({"family": family, "lengths": lengths})
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e_cpu", "--memory-worker", spec,
           "--threads", str(torch.get_num_threads()), *plan_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, budget.left_s()),
                              cwd=Path(__file__).resolve().parent.parent)
        lines = proc.stdout.strip().splitlines()
        failure = None if proc.returncode == 0 and lines else {
            "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    except subprocess.TimeoutExpired:
        failure = {"skipped": "skipped: over budget (memory worker timed out)"}
    if failure:
        return {c: {str(n): failure for n in ns} for c, ns in lengths.items()}
    measured = json.loads(lines[-1])
    # a fork that failed as a whole reports {"error": ...}: give every length of it that error
    return {c: {str(n): m for n in lengths[c]} if "error" in m else m for c, m in measured.items()}


# --- one model ---------------------------------------------------------------------------------


def bench_family(family: str, plan: Plan, configs: tuple[str, ...], args, budget: Budget, bar, report: dict) -> dict:
    result: dict = {"family": family, "prefill": [], "decode": None, "memory": {}}
    runners = build_runners(family, plan, configs)
    result["parameters"] = sum(p.numel() for p in next(iter(runners.values())).module.parameters())
    for length in plan.lengths:
        bar.set_postfix_str(f"{family} prefill {length}")
        with CpuLoad() as load:
            row = bench_prefill(family, runners, plan, length, budget, args.rel_tol)
        row["other_processes_cores_avg"] = load.others_cores
        result["prefill"].append(row)
        bar.update()
    longest = next((p for p in reversed(result["prefill"]) if fa_missed(p)), None)
    if longest and not args.no_profile and "profile" not in report and budget.left_s() > 0:
        name = fa_missed(longest)
        bar.set_postfix_str(f"{family} profile {name}")
        eager_ms = longest["configs"].get("eager", {}).get("median_ms")
        try:
            report["profile"] = profile_prefill(runners[name], plan, longest["length"], eager_ms)
        except Exception as e:  # noqa: BLE001
            report["profile"] = {"note": f"profiling failed: {_error(e)}"}
    if family not in ENCODERS and plan.decode_steps > 0:
        bar.set_postfix_str(f"{family} decode")
        result["decode"] = bench_decode(family, runners, plan, budget, args.rel_tol)
        bar.update()
    del runners
    torch._dynamo.reset()
    gc.collect()
    if not args.no_memory:
        bar.set_postfix_str(f"{family} memory")
        todo = {c: [p["length"] for p in result["prefill"] if "median_ms" in p["configs"][c]] for c in configs}
        measured = run_memory(family, todo, args.plan_args, budget) if budget.left_s() > 0 else {}
        for c in configs:
            result["memory"][c] = {
                str(p["length"]): measured.get(c, {}).get(str(p["length"]))
                or {"skipped": "not measured: the timing case did not run" if p["length"] not in todo[c]
                    else "skipped: over budget (run time used up)"}
                for p in result["prefill"]
            }
        bar.update()
    return result


# --- main --------------------------------------------------------------------------------------


def _csv(kind: Callable, valid: Optional[tuple] = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        bad = [x for x in items if valid is not None and x not in valid]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list{' of ' + ', '.join(valid) if valid else ''}; got {text!r}")
        return items

    return parse


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller models and lengths (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="hidden 64, lengths 64/128, 2 decode steps (the smoke test)")
    p.add_argument("--models", type=_csv(str, FAMILIES), default=None, help=f"default {','.join(FAMILIES)}; --quick {','.join(QUICK_MODELS)}")
    p.add_argument("--configs", type=_csv(str, tuple(CONFIGS)), default=DEFAULT_CONFIGS)
    p.add_argument("--lengths", type=_csv(int), default=None, help="prefill lengths, e.g. 512,2048,8192")
    p.add_argument("--decode-prompt", type=int, default=None)
    p.add_argument("--decode-steps", type=int, default=None, help="0: no decode")
    p.add_argument("--repeats", type=int, default=None, help="timed prefill calls per configuration")
    p.add_argument("--budget-min", type=float, default=None, help="run-time budget; cases predicted past it are skipped")
    p.add_argument("--case-cap-s", type=float, default=300, help="skip a prefill case predicted to take longer")
    p.add_argument("--rel-tol", type=float, default=1e-3, help="outputs ok when max abs diff <= this × max |eager|")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("lengths", args.lengths), ("decode_prompt", args.decode_prompt),
                                   ("decode_steps", args.decode_steps), ("repeats", args.repeats),
                                   ("budget_min", args.budget_min)) if v is not None}
    args.plan = replace(plan, **overrides)
    args.models = args.models or (QUICK_MODELS if args.quick else FAMILIES)
    if min(args.plan.lengths) < 2 or args.plan.repeats < 1 or args.plan.decode_steps < 0 or args.plan.decode_prompt < 1:
        p.error("lengths must be >= 2, --repeats >= 1, --decode-steps >= 0, --decode-prompt >= 1")
    # What a memory worker needs to rebuild the same models.
    args.plan_args = [a for a, on in (("--quick", args.quick), ("--tiny", args.tiny)) if on]
    args.plan_args += ["--lengths", ",".join(map(str, args.plan.lengths))]
    if args.decode_prompt is not None:
        args.plan_args += ["--decode-prompt", str(args.decode_prompt)]
    if args.decode_steps is not None:
        args.plan_args += ["--decode-steps", str(args.decode_steps)]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    plan = args.plan
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.reset()  # code compiled earlier in this process (same model classes) must not be reused
    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        print(json.dumps({c: run_forked(memory_worker, spec["family"], c, plan, ns) if ns else {}
                          for c, ns in spec["lengths"].items()}))
        return 0

    from tqdm import tqdm

    command = command_line("python -m benchmarks e2e", sys.argv[1:] if argv is None else argv)
    report: dict = {
        "machine": machine_info(), "command": command, "plan": asdict(plan), "configs": list(args.configs),
        "families_requested": list(args.models), "rel_tol": args.rel_tol, "families": [],
    }
    print(describe_machine(report["machine"]), flush=True)
    budget = Budget(plan.budget_min, args.case_cap_s)
    per_family = len(plan.lengths) + (0 if args.no_memory else 1)
    total = sum(per_family + (0 if f in ENCODERS or plan.decode_steps == 0 else 1) for f in args.models)
    t_start = time.perf_counter()
    with CpuLoad() as load, tqdm(total=total, desc="e2e", unit="case") as bar:
        for family in args.models:
            report["families"].append(bench_family(family, plan, args.configs, args, budget, bar, report))
    report["load"] = load.as_dict()
    report["total_s"] = time.perf_counter() - t_start
    report["targets"] = targets(report)

    text = markdown(report)
    write_report(args.out_dir / "e2e_cpu", report, text)
    plot(report, args.out_dir / "e2e_cpu.png")
    print(text[text.index("## Targets"):])
    print(f"wrote {args.out_dir}/e2e_cpu.{{json,md,png}} in {report['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
