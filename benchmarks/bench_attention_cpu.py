"""Op-level CPU benchmark: fa_dynamo's attention against eager attention and SDPA.

    python -m benchmarks.bench_attention_cpu            # full run: ~2 min on 2 idle cores
    python -m benchmarks.bench_attention_cpu --quick    # smaller shapes: ~25 s

(Under heavy background load the repeat counts shrink so a full run stays under ~8 minutes;
every case records how many cores other processes kept busy while it was timed.)

Every case times, on the same q/k/v (fp32, batch 1, seed 0), in the same process:

* ``eager``     — attention as Hugging Face's eager path writes it: ``q @ kᵀ * scale`` plus an
  additive float mask (``finfo.min`` where hidden, built once outside the timed call, as a
  model builds it once per forward), softmax in fp32, ``@ v``; ``repeat_kv`` for GQA.
* ``sdpa``      — ``F.scaled_dot_product_attention``: ``is_causal=True`` for causal, the same
  additive mask as eager for a sliding window, ``enable_gqa=True`` for GQA (no copies).
* ``op``        — ``fa_dynamo.attention`` called directly with the band (``max_offset=0`` causal,
  ``min_offset=-(w-1), max_offset=0`` for a window of ``w``).
* ``compiled_fa`` — ``torch.compile(fn, backend="fastattention")`` where ``fn`` is the eager
  attention with its mask built *inside* (``full(min).triu(1)`` causal, ``arange`` comparisons for
  a window), so the attention pass lifts the mask into a band and no Sq×Sk tensor is built.
  (The backend object is ``FastAttentionBackend()``, what the name ``"fastattention"``
  resolves to, kept so the pass reports can be checked and saved.)
* ``inductor``  — the same ``fn`` compiled by ``torch.compile(fn)`` (Inductor).

Results go to ``benchmarks/results/attention_cpu.{json,md,png}``. Peak memory is measured at
8192 tokens (causal, 4 heads × 64) in one subprocess per method (forked once more so that its
``ru_maxrss`` is its own, see ``_forked``): after a warm-up call (which also compiles) the
peak-RSS counter is reset (``/proc/self/clear_refs``), one more call runs, and the peak is
``ru_maxrss`` after it minus the resident size before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fa_dynamo
from benchmarks.timing import CpuLoad, describe_machine, machine_info, measure_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("eager", "sdpa", "op", "compiled_fa", "inductor")
LABELS = {
    "eager": "eager (HF-style)",
    "sdpa": "SDPA",
    "op": "fa_dynamo op",
    "compiled_fa": "compile fastattention",
    "inductor": "compile inductor",
}
MiB = 1024**2
# SDPA, the op and the compiled op overlap on the causal series: tell them apart by marker and dash.
STYLES = {
    "eager": {"marker": "o"},
    "sdpa": {"marker": "s", "markersize": 9, "linewidth": 3, "alpha": 0.6},
    "op": {"marker": "^", "linestyle": "--"},
    "compiled_fa": {"marker": "x", "linestyle": ":", "markersize": 9},
    "inductor": {"marker": "D"},
}


@dataclass(frozen=True)
class Case:
    name: str
    seq: int
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    batch: int = 1
    mask: str = "causal"  # causal | window | none
    window: int = 0
    headline: bool = False

    @property
    def visible_fraction(self) -> float:
        """Fraction of the Sq×Sk (query, key) pairs the mask leaves visible, for FLOP counts.

        Causal counts as 1/2 by convention; a window of ``w`` counts its exact visible pairs
        ``w(w+1)/2 + (S-w)·w`` over ``S²``.
        """
        s = self.seq
        if self.mask == "causal":
            return 0.5
        if self.mask == "window":
            w = min(self.window, s)
            return (w * (w + 1) / 2 + (s - w) * w) / (s * s)
        return 1.0

    @property
    def flops(self) -> float:
        """4·B·H·Sq·Sk·D (two GEMMs, 2 FLOPs per multiply-add) × visible fraction."""
        return 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim * self.visible_fraction

    def describe(self) -> str:
        mask = {"causal": "causal", "none": "no mask", "window": f"sliding window {self.window}"}[self.mask]
        heads = f"{self.heads} heads" if self.kv_heads == self.heads else f"GQA {self.heads} q / {self.kv_heads} kv heads"
        return f"{mask}, {self.seq} tokens, {heads} × {self.head_dim}, B={self.batch}, fp32"


FULL_CASES = (
    Case("causal-1024", 1024),
    Case("causal-2048", 2048),
    Case("causal-4096", 4096, headline=True),
    Case("window512-4096", 4096, mask="window", window=512),
    Case("nomask-2048", 2048, mask="none"),
    Case("gqa8x2-causal-2048", 2048, kv_heads=2),
)
QUICK_CASES = (
    Case("causal-256", 256),
    Case("causal-512", 512),
    Case("causal-1024", 1024, headline=True),
    Case("window128-1024", 1024, mask="window", window=128),
    Case("nomask-512", 512, mask="none"),
    Case("gqa8x2-causal-512", 512, kv_heads=2),
)


# --- the attention implementations -------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's ``repeat_kv``: [B, Hkv, S, D] → [B, Hkv·n_rep, S, D]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q, k, v, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """HF ``eager_attention_forward`` (inference: no dropout)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def additive_mask(case: Case, dtype=torch.float32) -> Optional[torch.Tensor]:
    """[1, 1, S, S]: 0 where visible, finfo.min where hidden (HF's convention); None if no mask."""
    if case.mask == "none":
        return None
    i = torch.arange(case.seq)[:, None]
    j = torch.arange(case.seq)[None, :]
    visible = j <= i
    if case.mask == "window":
        visible &= j > i - case.window
    mask = torch.zeros(case.seq, case.seq, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def make_inline(case: Case) -> Callable:
    """The eager attention with its mask built inside, for the two compiled methods."""
    window = case.window

    def causal(q, k, v):
        s = q.shape[-2]
        mask = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
        return eager_attention(q, k, v, mask[None, None])

    def sliding(q, k, v):
        s = q.shape[-2]
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        visible = (j <= i) & (j > i - window)
        mask = torch.zeros(s, s, dtype=q.dtype).masked_fill(~visible, torch.finfo(q.dtype).min)
        return eager_attention(q, k, v, mask[None, None])

    def unmasked(q, k, v):
        return eager_attention(q, k, v, None)

    return {"causal": causal, "window": sliding, "none": unmasked}[case.mask]


def op_kwargs(case: Case) -> dict:
    if case.mask == "causal":
        return {"max_offset": 0}
    if case.mask == "window":
        return {"min_offset": -(case.window - 1), "max_offset": 0}
    return {}


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.heads, case.seq, case.head_dim, generator=g)
    k = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=g)
    v = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, generator=g)
    return q, k, v


def build_methods(case: Case, q, k, v, methods: tuple[str, ...]) -> tuple[dict, dict]:
    """``{method: zero-arg callable}`` plus per-method notes (compile time, pass reports)."""
    needs_mask = "eager" in methods or ("sdpa" in methods and case.mask == "window")
    mask = additive_mask(case) if needs_mask else None
    fns: dict[str, Callable] = {}
    notes: dict[str, dict] = {}
    if "eager" in methods:
        fns["eager"] = lambda: eager_attention(q, k, v, mask)
    if "sdpa" in methods:
        gqa = case.kv_heads != case.heads
        if case.mask == "causal":
            fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if "op" in methods:
        kw = op_kwargs(case)
        fns["op"] = lambda: fa_dynamo.attention(q, k, v, **kw)
    for name in ("compiled_fa", "inductor"):
        if name not in methods:
            continue
        torch._dynamo.reset()
        if name == "compiled_fa":
            backend = fa_dynamo.FastAttentionBackend(keep_graphs=True)
            compiled = torch.compile(make_inline(case), backend=backend, dynamic=False)
        else:
            backend = None
            compiled = torch.compile(make_inline(case), dynamic=False)
        t0 = time.perf_counter()
        compiled(q, k, v)  # compiles
        notes[name] = {"compile_and_first_call_s": time.perf_counter() - t0}
        if backend is not None:
            notes[name].update(_rewrites(backend))
        fns[name] = (lambda c: (lambda: c(q, k, v)))(compiled)
    return fns, notes


def _rewrites(backend) -> dict:
    """What the attention pass did, read off the rewritten graphs (robust to report formats)."""
    out: dict = {"pass_reports": [r.summary() for reports in backend.reports for r in reports], "op_calls": []}
    for _, after in getattr(backend, "graphs", []):
        for node in after.graph.nodes:
            if node.op == "call_function" and "fa_dynamo.attention" in str(node.target):
                a = node.args
                out["op_calls"].append({
                    "min_offset": a[8] if len(a) > 8 else None,
                    "max_offset": a[9] if len(a) > 9 else None,
                    "dense_bias": len(a) > 3 and a[3] is not None,
                    "dense_mask": len(a) > 4 and a[4] is not None,
                })
    out["fused"] = bool(out["op_calls"])
    return out


def _rewrite_summary(row: dict) -> str:
    calls = row.get("op_calls") or []
    if not calls:
        return "NOT fused: " + "; ".join(row.get("pass_reports", []))
    parts = []
    for c in calls:
        band = f"band [{c['min_offset']}, {c['max_offset']}]" if (c["min_offset"], c["max_offset"]) != (None, None) else "no band"
        dense = " + dense " + "/".join(n for n in ("bias", "mask") if c[f"dense_{n}"]) if c["dense_bias"] or c["dense_mask"] else ""
        parts.append(f"fa_dynamo::attention with {band}{dense}")
    return "; ".join(parts)


# --- timing ------------------------------------------------------------------------------------


def repeats_for(case: Case, quick: bool, override: Optional[int] = None) -> int:
    if override:
        return override
    if quick:
        return 5
    return 9 if case.seq >= 4096 else 11


def run_case(case: Case, methods: tuple[str, ...], quick: bool, repeats: Optional[int] = None) -> dict:
    q, k, v = make_inputs(case)
    fns, notes = build_methods(case, q, k, v, methods)
    # Correctness against SDPA (or eager when SDPA is not run), on the same inputs.
    ref_name = "sdpa" if "sdpa" in fns else next(iter(fns))
    ref = fns[ref_name]()
    errors = {name: float((fn() - ref).abs().max()) for name, fn in fns.items() if name != ref_name}
    errors[ref_name] = None  # the reference itself
    del ref
    gc.collect()
    with CpuLoad() as load:
        timings = measure_interleaved(
            fns, warmup=1, repeats=repeats_for(case, quick, repeats), budget_s=None if repeats else (5 if quick else 40)
        )
    rows = {}
    for name, t in timings.items():
        rows[name] = {
            **t.as_dict(),
            "median_ms": t.median * 1e3,
            "gflops": case.flops / t.median / 1e9,
            "max_abs_err_vs_" + ref_name: errors[name],
            **notes.get(name, {}),
        }
    for name, row in rows.items():
        if "sdpa" in rows:
            row["speedup_vs_sdpa"] = rows["sdpa"]["median_ms"] / row["median_ms"]
        if "eager" in rows:
            row["speedup_vs_eager"] = rows["eager"]["median_ms"] / row["median_ms"]
    del fns
    torch._dynamo.reset()
    gc.collect()
    return {
        "case": asdict(case),
        "description": case.describe(),
        "flops": case.flops,
        "other_processes_cores_avg": load.others_cores,
        "methods": rows,
    }


# --- memory ------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak-RSS high-water mark to the current RSS
        return True
    except OSError:
        return False


def memory_worker(method: str, seq: int, heads: int, head_dim: int) -> dict:
    """Runs in its own process: peak RSS of one call of ``method`` on causal [1, heads, seq, D]."""
    case = Case(f"memory-causal-{seq}", seq, heads=heads, kv_heads=heads, head_dim=head_dim)
    q, k, v = make_inputs(case)
    gc.collect()
    base_first = _rss_mib()
    fns, _ = build_methods(case, q, k, v, (method,))  # compiles and runs the compiled ones once
    fns[method]()
    first_peak = _maxrss_mib() - base_first
    gc.collect()
    reset = _reset_peak()
    base = _rss_mib()
    max_before = _maxrss_mib()
    fns[method]()
    max_after = _maxrss_mib()
    prebuilt = case.seq * case.seq * 4 / MiB if method == "eager" else 0.0
    return {
        "method": method,
        "prebuilt_mask_mib": prebuilt,
        "peak_delta_mib": max_after - base,
        "vmhwm_delta_mib": _vmhwm_mib() - base,
        "exact": reset or max_after > max_before,
        "first_call_peak_delta_mib": first_peak,
        "baseline_rss_mib": base,
        "peak_reset": reset,
    }


def _forked(fn: Callable, *args) -> dict:
    """``fn(*args)`` in a forked child; its JSON-able result comes back through a pipe.

    Why: a process started from a big parent reports the parent's peak as its own ``ru_maxrss``
    (Linux folds the old address space's high-water mark into the signal struct's ``maxrss``
    at ``execve``, and ``clear_refs`` cannot reset that). A forked child starts with a zeroed
    signal struct, so its ``ru_maxrss`` is its own: this worker's, not the benchmark's.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            torch._dynamo.config.cache_size_limit = 64
            payload = json.dumps(fn(*args))
            code = 0
        except BaseException as e:  # report, never fall through into the parent's code
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
            code = 1
        with os.fdopen(write_fd, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        payload = f.read()
    os.waitpid(pid, 0)
    return json.loads(payload) if payload else {"error": "the memory worker died without a result"}


def eager_memory_estimate(seq: int, heads: int) -> float:
    """Bytes eager needs at once, roughly: three B·H·S² fp32 tensors plus the S² mask."""
    return 3 * heads * seq * seq * 4 + seq * seq * 4


def _mem_available() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_memory(
    methods: tuple[str, ...], seq: int, heads: int, head_dim: int, limit_gib: float, skip: Optional[dict] = None
) -> dict:
    skip = skip or {}
    out: dict = {"seq": seq, "heads": heads, "head_dim": head_dim, "mask": "causal", "methods": {}}
    out["inputs_mib"] = 3 * heads * seq * head_dim * 4 / MiB
    out["output_mib"] = heads * seq * head_dim * 4 / MiB
    for method in methods:
        if method == "eager":
            need = eager_memory_estimate(seq, heads)
            avail = _mem_available()
            cap = limit_gib * 1024**3 if avail is None else min(limit_gib * 1024**3, 0.8 * avail)
            if need > cap:
                out["methods"][method] = {"skipped": f"needs ~{need / 1024**3:.1f} GiB > {cap / 1024**3:.1f} GiB allowed"}
                continue
        if method in skip:
            out["methods"][method] = {"skipped": skip[method]}
            continue
        cmd = [sys.executable, "-m", "benchmarks.bench_attention_cpu", "--memory-worker", method,
               "--threads", str(torch.get_num_threads()),
               "--memory-seq", str(seq), "--memory-heads", str(heads), "--memory-head-dim", str(head_dim)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not proc.stdout.strip():
            out["methods"][method] = {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["worker_wall_s"] = wall
        out["methods"][method] = result
    return out


# --- reporting ---------------------------------------------------------------------------------


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# fa_dynamo attention — CPU op-level benchmark",
        "",
        f"- **Machine**: {describe_machine(m)}",
        f"- **Date**: {m['date']}",
        f"- **Command**: `{report['command']}` (run from the repository root)",
        f"- **Background load**: other processes kept {_fmt(report['load'].get('other_processes_cores_avg'), 2)} "
        f"of {m['cores']} cores busy on average during the run (from /proc/stat; timings are noisier "
        "the larger this is)",
        "",
        "Median of N timed calls after one warm-up call, methods interleaved round-robin on the same "
        "inputs (N per case below; it is cut, to no fewer than 3, when a case would take over 40 s, 5 s with --quick). GFLOP/s counts useful FLOPs only, 4·B·H·Sq·Sk·D × visible fraction (½ causal, the "
        "exact visible fraction for a window), the same count for every method — eager really does "
        "the full Sq×Sk. *vs SDPA* and *vs eager* are speedups: t(SDPA)/t(method) and "
        "t(eager)/t(method); > 1 means faster. *min ms* is the fastest sample, shown because on a "
        "shared machine the median can be inflated by other processes (see Background load). "
        "*max abs err* is against SDPA's output on the same inputs.",
        "",
        "Methods: " + "; ".join(f"**{LABELS[k]}**" for k in report["methods"]) + ". "
        "Eager gets its additive mask prebuilt (as a model builds it once per forward); SDPA uses "
        "`is_causal=True` for causal, the same additive float mask for a window, `enable_gqa=True` "
        "for GQA; the fa_dynamo op gets the band; both compiled methods compile the same function, "
        "which builds its mask inside with `triu` / `arange` comparisons.",
        "",
        "| case | method | median ms | min ms | GFLOP/s | vs SDPA | vs eager | max abs err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        for name, row in c["methods"].items():
            err_key = next((k for k in row if k.startswith("max_abs_err_vs_")), None)
            err = row.get(err_key) if err_key else None
            lines.append(
                f"| {c['case']['name']} | {LABELS[name]} | {row['median_ms']:.1f} | {row['min_s'] * 1e3:.1f} | "
                f"{row['gflops']:.1f} | "
                f"{_fmt(row.get('speedup_vs_sdpa'), 2)} | {_fmt(row.get('speedup_vs_eager'), 2)} | "
                f"{'ref' if err is None else f'{err:.1e}'} |"
            )
    lines += ["", "Cases:", ""]
    for c in report["cases"]:
        busy = c.get("other_processes_cores_avg")
        lines.append(
            f"- `{c['case']['name']}`: {c['description']}; {c['flops'] / 1e9:.2f} GFLOP useful; "
            f"{len(next(iter(c['methods'].values()))['samples_s'])} timed calls per method; "
            f"other processes busy on {_fmt(busy, 2)} cores while it was timed"
        )
    comp = [
        (c["case"]["name"], name, row)
        for c in report["cases"]
        for name, row in c["methods"].items()
        if "compile_and_first_call_s" in row
    ]
    if comp:
        lines += ["", "Compile + first call (s), and what the attention pass produced (read off the rewritten graph):", ""]
        for case_name, name, row in comp:
            extra = f" — {_rewrite_summary(row)}" if "pass_reports" in row else ""
            lines.append(f"- `{case_name}` {LABELS[name]}: {row['compile_and_first_call_s']:.1f} s{extra}")
    mem = report.get("memory")
    if mem:
        lines += [
            "",
            f"## Peak memory — causal, {mem['seq']} tokens, {mem['heads']} heads × {mem['head_dim']}, fp32",
            "",
            f"One subprocess per method. After a warm-up call (which also compiles), the peak-RSS mark "
            f"is reset via `/proc/self/clear_refs`, one call runs, and the peak is `ru_maxrss` minus the "
            f"RSS before the call. Inputs (q, k, v) take {mem['inputs_mib']:.0f} MiB and are not "
            f"counted; the {mem['output_mib']:.0f} MiB output is (unless the allocator reuses the warm-up "
            f"call's freed block). Eager's additive mask is built before the call (as a model builds "
            f"it once per forward): its {mem['seq'] ** 2 * 4 / MiB:.0f} MiB come on top of eager's column. "
            f"The last column is the peak of the first call over the RSS after the inputs: it includes "
            f"compilation and, for eager, building the mask.",
            "",
            "| method | peak above baseline (MiB) | first call incl. compile (MiB) |",
            "|---|---:|---:|",
        ]
        for name, r in mem["methods"].items():
            if "skipped" in r or "error" in r:
                lines.append(f"| {LABELS[name]} | {r.get('skipped') or r.get('error')} | |")
            else:
                # max(0, ·): when the allocator reuses the warm-up call's freed blocks RSS may not rise at all
                peak, first = max(0.0, r["peak_delta_mib"]), max(0.0, r["first_call_peak_delta_mib"])
                lines.append(f"| {LABELS[name]} | {peak:.0f} | {first:.0f} |")
    h = report.get("headline")
    if h:
        lines += ["", "## Headline", ""] + [f"- {line}" for line in h]
    slower = [
        f"`{c['case']['name']}` {LABELS[name]} {row['speedup_vs_sdpa']:.2f}×"
        for c in report["cases"]
        for name, row in c["methods"].items()
        if name in ("op", "compiled_fa") and row.get("speedup_vs_sdpa", 1.0) < 0.95
    ]
    lines += ["", "fa_dynamo (op or compiled) more than 5% slower than SDPA: " + ("; ".join(slower) or "nowhere") + "."]
    busy = [c for c in report["cases"] if (c.get("other_processes_cores_avg") or 0) > 0.25]
    if busy:
        lines += [
            "",
            f"**Warning**: other processes kept ≥ 0.25 cores busy while {', '.join(c['case']['name'] for c in busy)} "
            "ran. Every ATen op is an OpenMP parallel region over all cores; when a core is taken, each region "
            "waits for a descheduled thread, so methods that issue many small ops (fa_dynamo's tiled path: "
            "sliding window) slow down far more than one-kernel methods (SDPA). Rerun on a quiet machine.",
        ]
    lines += ["", "Plot: `attention_cpu.png` (time vs sequence length, causal series).", ""]
    return "\n".join(lines)


def headline(report: dict) -> list[str]:
    out = []
    head = next((c for c in report["cases"] if c["case"]["headline"]), None)
    if head:
        r = head["methods"]
        for name in ("op", "compiled_fa"):
            if name in r:
                out.append(
                    f"{head['case']['name']}: {LABELS[name]} {r[name]['median_ms']:.1f} ms — "
                    f"{_fmt(r[name].get('speedup_vs_sdpa'), 2)}× SDPA's speed ({r['sdpa']['median_ms']:.1f} ms), "
                    f"{_fmt(r[name].get('speedup_vs_eager'), 2)}× eager's ({r['eager']['median_ms']:.1f} ms)"
                    if "sdpa" in r and "eager" in r else f"{head['case']['name']}: {LABELS[name]} {r[name]['median_ms']:.1f} ms"
                )
    for c in report["cases"]:
        if c["case"]["mask"] == "window" and "op" in c["methods"] and "sdpa" in c["methods"]:
            r = c["methods"]
            out.append(
                f"{c['case']['name']}: fa_dynamo op {r['op']['median_ms']:.1f} ms vs SDPA with an explicit mask "
                f"{r['sdpa']['median_ms']:.1f} ms — {r['op']['speedup_vs_sdpa']:.2f}× SDPA's speed"
            )
    return out


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    series = [
        c for c in report["cases"]
        if c["case"]["mask"] == "causal" and c["case"]["kv_heads"] == c["case"]["heads"]
    ]
    series.sort(key=lambda c: c["case"]["seq"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in report["methods"]:
        pts = [(c["case"]["seq"], c["methods"][name]["median_ms"]) for c in series if name in c["methods"]]
        if pts:
            ax.plot(*zip(*pts), label=LABELS[name], **STYLES.get(name, {}))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([c["case"]["seq"] for c in series], [str(c["case"]["seq"]) for c in series])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("median time per call (ms, log)")
    c0 = series[0]["case"] if series else {}
    ax.set_title(
        f"Causal attention, {c0.get('heads')} heads × {c0.get('head_dim')}, fp32, B=1\n{report['machine']['cpu_model']}, "
        f"{report['machine']['torch_threads']} threads, torch {report['machine']['torch']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- main --------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes (under a minute)")
    p.add_argument("--no-compile", action="store_true", help="skip the two torch.compile methods")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-seq", type=int, default=None, help="tokens for the memory runs (default 8192, quick 2048)")
    p.add_argument("--memory-heads", type=int, default=4)
    p.add_argument("--memory-head-dim", type=int, default=64)
    p.add_argument("--memory-limit-gib", type=float, default=8.0, help="skip eager memory above this estimate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, = cores)")
    p.add_argument(
        "--repeats", type=int, default=None,
        help="timed calls per method (default 11, 9 at 4096+, 5 --quick; fewer, >= 3, if a case would take over 40 s / 5 s)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--memory-worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(_forked(memory_worker, args.memory_worker, args.memory_seq, args.memory_heads, args.memory_head_dim)))
        return 0

    torch._dynamo.config.cache_size_limit = 64
    methods = tuple(m for m in METHODS if not (args.no_compile and m in ("compiled_fa", "inductor")))
    cases = QUICK_CASES if args.quick else FULL_CASES
    mem_seq = args.memory_seq or (2048 if args.quick else 8192)
    command = "python -m benchmarks.bench_attention_cpu " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    report: dict = {"machine": machine_info(), "command": command.strip(), "methods": list(methods), "cases": []}
    print(describe_machine(report["machine"]), flush=True)
    t_start = time.perf_counter()
    with CpuLoad() as load:
        for case in cases:
            t0 = time.perf_counter()
            result = run_case(case, methods, args.quick, args.repeats)
            report["cases"].append(result)
            busy = _fmt(result["other_processes_cores_avg"], 2)
            print(f"\n{case.name}: {case.describe()}  ({time.perf_counter() - t0:.0f} s; others busy on {busy} cores)", flush=True)
            for name, row in result["methods"].items():
                print(
                    f"  {LABELS[name]:<24} {row['median_ms']:9.1f} ms  {row['gflops']:7.1f} GFLOP/s  "
                    f"vs SDPA {_fmt(row.get('speedup_vs_sdpa'), 2):>5}  vs eager {_fmt(row.get('speedup_vs_eager'), 2):>6}",
                    flush=True,
                )
        if not args.no_memory:
            t0 = time.perf_counter()
            # --quick keeps to a minute: Inductor's memory (a second C++ compile) is left out there.
            skip = {"inductor": "not measured with --quick"} if args.quick else {}
            report["memory"] = run_memory(
                methods, mem_seq, args.memory_heads, args.memory_head_dim, args.memory_limit_gib, skip
            )
            print(f"\npeak memory, causal {mem_seq} × {args.memory_heads} heads ({time.perf_counter() - t0:.0f} s)")
            for name, r in report["memory"]["methods"].items():
                shown = r.get("skipped") or r.get("error") or f"{r['peak_delta_mib']:.0f} MiB"
                print(f"  {LABELS[name]:<24} {shown}")
    report["load"] = load.as_dict()
    report["total_s"] = time.perf_counter() - t_start
    report["headline"] = headline(report)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "attention_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "attention_cpu.md").write_text(markdown(report))
    plot(report, args.out_dir / "attention_cpu.png")
    print("\n" + "\n".join(report["headline"]))
    print(f"\nwrote {args.out_dir}/attention_cpu.{{json,md,png}} in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
