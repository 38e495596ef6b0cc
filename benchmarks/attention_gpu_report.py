"""The GPU suite's rendering: markdown tables (TFLOP/s, peak memory, correctness, failures) and the plot.

Everything here reads the report dict ``bench_attention_gpu.main`` builds; nothing here measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks.attention_gpu_cases import PASSES, Case
from benchmarks.report_writing import machine_lines, pyplot, save_figure

LABELS = {  # every method, in the order of bench_attention_gpu.METHODS
    "fa_dynamo_triton": "fa_dynamo triton", "fa_dynamo_auto": "fa_dynamo auto", "sdpa_flash": "SDPA flash",
    "sdpa_efficient": "SDPA efficient", "sdpa_cudnn": "SDPA cuDNN", "sdpa_math": "SDPA math",
    "flex": "FlexAttention", "xformers": "xformers",
}
# one colour and marker per method in every panel; auto runs the Triton kernel on CUDA, so it is drawn over it
STYLES = {m: {"color": f"C{i}", "marker": "osD^v<>p"[i]} for i, m in enumerate(LABELS)}
STYLES["fa_dynamo_auto"].update(linestyle="--", marker="x", markersize=8)

def versions_line(gpu: dict) -> str:
    cuda = f"CUDA {gpu['cuda']}, cuDNN {gpu.get('cudnn')}, " if gpu.get("cuda") else "no CUDA, "
    xf = f", xformers {gpu['xformers']}" if gpu.get("xformers") else ", xformers not installed"
    return f"{cuda}torch {gpu['torch']}, triton {gpu['triton']}{xf}"


def _cell(result: Optional[dict], ok: Optional[bool], notes: dict) -> str:
    if result is None:
        return ""
    if "error" in result:
        if result["error"] == "OOM":
            return "OOM"
        number = notes.setdefault(result["error"], len(notes) + 1)
        return f"—[{number}]"
    return f"{result['tflops']:.3g}" + (" ✗" if ok is False else "")


def _check_of(report: dict, case: dict, method: str) -> Optional[dict]:
    """The check at the case's configuration's first length, wherever that row is."""
    config = Case(**case).config
    rows = [r for r in report["cases"].values() if Case(**r["case"]).config == config]
    for row in sorted(rows, key=lambda r: r["case"]["seq_len"]):
        if "check" in row["results"].get(method, {}):
            return row["results"][method]["check"]
    return None


def markdown(report: dict) -> str:
    gpu, s = report["device"], report["settings"]
    methods = report["methods"]
    lines = [f"# Attention TFLOP/s on {gpu['device']}: fa_dynamo's Triton kernel against SDPA, Flex, xformers", ""]
    if s["smoke"]:
        lines += ["**SMOKE RUN on CPU tensors (Triton interpreter): a pipeline check, not GPU figures.**", ""]
    lines += [
        f"- **Device**: {gpu['device']}"
        + (f" ({gpu['capability']}, {gpu['multiprocessors']} SMs, {gpu['gpu_memory_gib']} GiB)" if gpu.get("capability") else ""),
        f"- **Software**: {versions_line(gpu)}",
        *machine_lines(report["host"], label="Host"),
        "- **Commands**: " + "; ".join(f"`{r['command']}` ({r['date']})" for r in report["runs"]),
        f"- **Shapes**: {s['dtype']}, B = {s['tokens']} // S (≥ 1), H = {s['model_dim']} // d, "
        + (f"K/V heads H / {s['gqa']}" if s["gqa"] > 1 else "no GQA"),
        "",
        "TFLOP/s = 4·B·H·S²·d (½ when causal, × 3.5 for fwd+bwd) / median time (" + s["timer"] + "); higher is "
        "better. *triton/flash* = fa_dynamo triton ÷ SDPA flash. ✗: the method failed the correctness check "
        "(against float64 SDPA math) in that configuration, do not trust the number. OOM: out of memory; "
        "—[n]: failed, reason n below.",
        "",
    ]
    notes: dict[str, int] = {}
    rows = sorted(report["cases"].values(), key=lambda r: (r["case"]["head_dim"], not r["case"]["causal"],
                                                           r["case"]["pass_name"], r["case"]["seq_len"]))
    head = "| S | d | mask | pass | B×H |"
    lines += ["## TFLOP/s", "", head + "".join(f" {LABELS[m]} |" for m in methods) + " triton/flash |",
              "|" + "---:|" * 5 + "---:|" * (len(methods) + 1)]
    for row in rows:
        c, res = row["case"], row["results"]
        checks = {m: (_check_of(report, c, m) or {}).get("ok") for m in methods}
        cells = [_cell(res.get(m), checks[m], notes) for m in methods]
        tri, fl = res.get("fa_dynamo_triton", {}), res.get("sdpa_flash", {})
        ratio = f"{tri['tflops'] / fl['tflops']:.2f}" if "tflops" in tri and "tflops" in fl else ""
        lines.append(_row_prefix(c) + "".join(f" {x} |" for x in cells) + f" {ratio} |")
    lines += ["", "## Peak memory above the inputs (MiB)", ""]
    if any(r.get("peak_mib") is not None for row in rows for r in row["results"].values()):
        lines += [head + "".join(f" {LABELS[m]} |" for m in methods), "|" + "---:|" * (5 + len(methods))]
        for row in rows:
            res = row["results"]
            cells = [f"{res[m]['peak_mib']:.0f}" if res.get(m, {}).get("peak_mib") is not None else
                     ("OOM" if res.get(m, {}).get("error") == "OOM" else "") for m in methods]
            lines.append(_row_prefix(row["case"]) + "".join(f" {x} |" for x in cells))
    else:
        lines.append("Not measured: peak memory comes from the CUDA allocator.")
    lines += ["", "## Correctness (first length of each configuration, max |error| / tolerance)", "",
              "| S | d | mask | pass | method | ok | out | dq | dk | dv |", "|---:|---:|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        for m in methods:
            check = row["results"].get(m, {}).get("check")
            if check is None:
                continue
            c = row["case"]
            errs = check.get("errors", {})
            cells = [f"{errs[t]['max_err']:.2g} / {errs[t]['tol']:.2g}" if t in errs else "" for t in ("out", "dq", "dk", "dv")]
            ok = {True: "ok", False: "**FAIL**", None: check.get("error", "not checked")}[check["ok"]]
            lines.append(f"| {c['seq_len']} | {c['head_dim']} | {'causal' if c['causal'] else 'full'} | {c['pass_name']} "
                         f"| {LABELS[m]} | {ok} |" + "".join(f" {x} |" for x in cells))
    if notes:
        lines += ["", "## Failures", ""] + [f"{n}. {text}" for text, n in notes.items()]
    if report.get("not_run"):
        lines += ["", f"**Not run (time budget)**: {', '.join(report['not_run'])}"]
    return "\n".join(lines) + "\n"


def _row_prefix(c: dict) -> str:
    mask = "causal" if c["causal"] else "full"
    return f"| {c['seq_len']} | {c['head_dim']} | {mask} | {c['pass_name']} | {c['batch']}×{c['heads']} |"


def plot(report: dict, path: Path) -> bool:
    """TFLOP/s against S, one line per method; a panel per (pass, head dim, mask)."""
    plt = pyplot()
    if plt is None:
        return False
    cases = [r["case"] for r in report["cases"].values()]
    passes = sorted({c["pass_name"] for c in cases}, key=PASSES.index)
    columns = sorted({(c["head_dim"], c["causal"]) for c in cases}, key=lambda x: (x[0], not x[1]))
    fig, axes = plt.subplots(len(passes), len(columns), figsize=(4.2 * len(columns), 3.6 * len(passes)),
                             squeeze=False, sharex=True)
    for i, pass_name in enumerate(passes):
        for j, (d, causal) in enumerate(columns):
            ax = axes[i][j]
            rows = sorted((r for r in report["cases"].values() if (r["case"]["pass_name"], r["case"]["head_dim"],
                           r["case"]["causal"]) == (pass_name, d, causal)), key=lambda r: r["case"]["seq_len"])
            for m in report["methods"]:
                points = [(r["case"]["seq_len"], r["results"][m]["tflops"]) for r in rows if "tflops" in r["results"].get(m, {})]
                if points:
                    ax.plot(*zip(*points), label=LABELS[m], **STYLES[m])
            lengths = [r["case"]["seq_len"] for r in rows]
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_title(f"{pass_name}, d={d}, {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("sequence length S")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=max(1, min(len(legend), 8)), fontsize=8)
    gpu = report["device"]
    smoke = " — SMOKE RUN ON CPU, not GPU figures" if report["settings"]["smoke"] else ""
    fig.suptitle(f"{gpu['device']}{smoke}\n{versions_line(gpu)}; {report['host']['date']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    save_figure(plt, fig, path)
    return True


