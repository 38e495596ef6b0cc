"""The decode suite's rendering: tables against the targets, and the plot.

Everything here reads the report dict ``bench_decode.main`` builds; nothing here measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks.report_writing import command_item, load_item, machine_lines, missed_by, or_dash, pyplot, save_figure
from benchmarks.timing import machine_caption

OP_TARGET_VS_SDPA = 3.0  # GQA decode over 32K keys, the eager code compiled vs SDPA(enable_gqa)
MODEL_TARGET_VS_UNCOMPILED = 1.5  # a step over a half-filled 32K static cache
BANDWIDTH_AIM = 0.5  # of the machine's read bandwidth


def _verdict(x: Optional[float], target: float) -> str:
    return "not measured" if x is None else "met" if x >= target else missed_by(x, target)


def _ms(m: dict) -> str:
    return m.get("error", "—")[:60] if "median_s" not in m else f"{m['median_s'] * 1e3:.2f}"


def _op_table(report: dict) -> list[str]:
    methods = list(report["op"][0]["methods"]) if report["op"] else []
    out = ["| batch | dtype | cache | keys (slots) | " + " | ".join(f"{m} ms" for m in methods)
           + " | fastattention GB/s | of bandwidth | vs SDPA | vs eager | fastattention: sites fused, max err |",
           "|---:|---|---|---:|" + "---:|" * len(methods) + "---:|---:|---:|---:|---:|"]
    for row in report["op"]:
        ms = row["methods"]
        fa = ms.get("fastattention", {})
        eager = ms.get("eager", {})
        vs_eager = (eager["median_s"] / fa["median_s"]) if "median_s" in fa and "median_s" in eager else None
        out.append(
            f"| {row['batch']} | {row['dtype']} | {row['cache']} | {row['context']} ({row['slots']}) | "
            + " | ".join(_ms(ms[m]) for m in methods)
            + f" | {or_dash(fa.get('gbps'))} | {or_dash(fa.get('of_bandwidth', 0) * 100, 0)}% | "
            f"**{or_dash(fa.get('vs_sdpa'), 2)}×** | {or_dash(vs_eager, 2)}× | {fa.get('fused') or '—'}, "
            f"{or_dash(fa.get('max_abs_err'), 8)} |")
    return out


def _model_table(report: dict) -> list[str]:
    out = ["| batch | dtype | cache | filled (slots) | uncompiled ms | Inductor ms | fastattention ms | tokens/s (fastattention) "
           "| vs uncompiled | vs Inductor | graphs compiled after the first call | max \\|Δ logits\\| | sites fused so far |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for row in report["model"]:
        c = row["configs"]
        fa, ind = c["fastattention"], c["inductor"]
        out.append(
            f"| {row.get('batch', 1)} | {row.get('dtype', 'fp32')} | {row['cache']} | {row['filled']} ({row['slots']}) | {_ms(c['uncompiled'])} | {_ms(ind)} | {_ms(fa)} | "
            f"{or_dash(fa.get('tokens_per_s'))} | **{or_dash(fa.get('vs_uncompiled'), 2)}×** | "
            f"{or_dash(ind['median_s'] / fa['median_s'] if 'median_s' in ind and 'median_s' in fa else None, 2)}× | "
            f"Inductor {ind['graphs_compiled_after']}, fastattention {fa['graphs_compiled_after']} | "
            f"Inductor {ind['max_abs_diff_logits']:.1e}, fastattention {fa['max_abs_diff_logits']:.1e} | "
            f"{row.get('fused') or '—'} |")
    return out


def targets(report: dict) -> list[str]:
    """The issue's targets, met or missed, from the rows that measure them."""
    lines = []
    op = [r for r in report["op"] if r["batch"] == 1 and r["dtype"] == "fp32" and r["context"] == 32768]
    for row in op:
        fa = row["methods"].get("fastattention", {})
        lines.append(f"- op, {row['cache']} cache, 32K keys: fastattention {or_dash(fa.get('vs_sdpa'), 2)}× SDPA "
                     f"(target {OP_TARGET_VS_SDPA}×: {_verdict(fa.get('vs_sdpa'), OP_TARGET_VS_SDPA)}); "
                     f"{or_dash(fa.get('of_bandwidth', 0) * 100, 0)}% of the read bandwidth "
                     f"(aim {BANDWIDTH_AIM:.0%}: {_verdict(fa.get('of_bandwidth'), BANDWIDTH_AIM)})")
    half = [r for r in report["model"] if r["cache"] == "static" and 2 * r["filled"] == r["slots"]
            and r.get("batch", 1) == 1 and r.get("dtype", "fp32") == "fp32"]
    for row in half:
        fa = row["configs"]["fastattention"]
        lines.append(f"- model step, static cache {row['filled']} of {row['slots']} slots: fastattention "
                     f"{or_dash(fa.get('vs_uncompiled'), 2)}× uncompiled (target {MODEL_TARGET_VS_UNCOMPILED}×: "
                     f"{_verdict(fa.get('vs_uncompiled'), MODEL_TARGET_VS_UNCOMPILED)})")
    return lines or ["- the targets' sizes (32K keys, a half-filled 32K cache) were not in this run"]


def markdown(report: dict) -> str:
    hq, hkv, d = report["heads"]
    bw = report["read_bandwidth"]
    sizes = report["model_sizes"]
    out = ["# Decode on CPU: attention over a KV cache, and a model step", ""]
    out += machine_lines(report["machine"])
    out += [command_item(report["command"], report["load"]["wall_s"] or 0),
            load_item(report["load"], report["machine"]["cores"]),
            f"- **Read bandwidth**: {bw['gbps']:.1f} GB/s (`sum` over {bw['gib']:g} GiB of float32, median)", "",
            "## Targets", "", *targets(report), "",
            f"## Attention, one query row, {hq} query heads over {hkv} key/value heads × {d}", "",
            "Milliseconds per call (medians of interleaved rounds, each call on its own copy of K/V); GB/s counts "
            "the filled keys' K/V bytes. `eager`: transformers' eager attention uncompiled; `inductor` and "
            "`fastattention`: the same code compiled; `sdpa`: `enable_gqa=True`; `flex`: compiled FlexAttention "
            "(a block mask over the filled slots).", "", *_op_table(report), "",
            f"## Model step: Llama as shipped (SDPA), {sizes['num_hidden_layers']} layers, hidden "
            f"{sizes['hidden_size']}, {sizes['num_attention_heads']}/{sizes['num_key_value_heads']} heads × "
            f"{sizes['head_dim']}, vocabulary {sizes['vocab_size']}", "",
            "Milliseconds per decode step (medians); tokens/s counts every sequence of the batch; the static "
            "cache's filled length changes between rows with no recompile; the dynamic cache's sequence dim is "
            "dynamic. Logits against the uncompiled model in the same dtype.", "",
            *_model_table(report), ""]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    """Op GB/s against context (batch 1, fp32, each cache) per method, the read bandwidth drawn across."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, cache in zip(axes, ("dynamic", "static")):
        rows = [r for r in report["op"] if r["batch"] == 1 and r["dtype"] == "fp32" and r["cache"] == cache]
        for method in (rows[0]["methods"] if rows else {}):
            pts = [(r["context"], r["methods"][method]["gbps"]) for r in rows if "gbps" in r["methods"][method]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(report["read_bandwidth"]["gbps"], color="gray", linestyle="--", label="read bandwidth (sum)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keys")
        ax.set_title(f"{cache} cache, batch 1, fp32")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s of the filled keys' K/V")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GQA decode attention — {machine_caption(report['machine'])}", fontsize=9)
    fig.tight_layout()
    return save_figure(plt, fig, path)
