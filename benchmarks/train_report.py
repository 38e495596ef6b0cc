"""The training suite's rendering: step times against the targets, first calls, memory, the plot.

Everything here reads the report dict ``bench_train.main`` builds; nothing here measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks.report_writing import command_item, load_item, machine_lines, missed_by, or_dash, pyplot, save_figure
from benchmarks.timing import machine_caption

TARGET_VS_UNCOMPILED = 1.1  # a GQA Llama step at 2048 tokens
TARGET_FIRST_CALL_VS_INDUCTOR = 1.5  # at most
FA_CONFIGS = ("fastattention", "fastattention_eager_attn")


def _fresh_first_calls(report: dict, family: str, tokens: int) -> Optional[dict]:
    """First calls measured each in a fresh child process (the memory runs), when there are."""
    for m in report["memory"]:
        if (m["family"], m["tokens"]) == (family, tokens) and all("first_call_s" in c for c in m["configs"].values()):
            return {name: c["first_call_s"] for name, c in m["configs"].items()}
    return None


def _ab_ratio(child: dict, name: str) -> float:
    """One A/B child's speed-up: the uncompiled model's median over the config's."""
    return child["uncompiled"]["median_s"] / child[name]["median_s"]


def pair_ratios(report: dict, family: str, tokens: int) -> Optional[dict]:
    """``{config: uncompiled median / config median}`` from the A/B children, when there are."""
    for pair in report.get("pairs", []):
        if (pair["family"], pair["tokens"]) == (family, tokens) and not any("error" in c for c in pair["configs"].values()):
            return {name: _ab_ratio(c, name) for name, c in pair["configs"].items()}
    return None


def targets(report: dict) -> list[str]:
    lines = []
    fresh = _fresh_first_calls(report, "llama", 2048)
    pairs = pair_ratios(report, "llama", 2048)
    for row in report["rows"]:
        if (row["family"], row["tokens"], row["dtype"]) != ("llama", 2048, "fp32"):
            continue
        c = row["configs"]
        for name in FA_CONFIGS:
            speed = pairs[name] if pairs else c[name]["vs_uncompiled"]
            first = (fresh[name] / fresh["inductor"] if fresh
                     else c[name]["first_call_s"] / c["inductor"]["first_call_s"])
            lines.append(
                f"- {name}: {speed:.2f}× uncompiled{' (A/B in a fresh process)' if pairs else ''} (target ≥ {TARGET_VS_UNCOMPILED}×: "
                f"{'met' if speed >= TARGET_VS_UNCOMPILED else missed_by(speed, TARGET_VS_UNCOMPILED)}); first call "
                f"{first:.2f}× Inductor's{' (each in a fresh process)' if fresh else ''} (target ≤ {TARGET_FIRST_CALL_VS_INDUCTOR}×: "
                f"{'met' if first <= TARGET_FIRST_CALL_VS_INDUCTOR else 'missed'})")
    return lines or ["- the target's case (Llama, 2048 tokens, fp32) was not in this run"]


def markdown(report: dict) -> str:
    s = report["sizes"]
    configs = list(report["rows"][0]["configs"]) if report["rows"] else []
    out = ["# Training on CPU: forward + backward, uncompiled vs Inductor vs fastattention", ""]
    out += machine_lines(report["machine"])
    out += [command_item(report["command"], report["load"]["wall_s"] or 0),
            load_item(report["load"], report["machine"]["cores"]), "",
            "## Targets (GQA Llama, 2048 tokens)", "", *targets(report), "",
            "## Step time", "",
            f"{s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads ({s['kv_heads']} key/value heads for "
            f"Llama and Mistral, window {report['window']}), vocabulary {s['vocab']}, random weights, batch 1 "
            "(BERT: 2, one row right-padded by a quarter). Seconds per forward + backward (medians of "
            f"{report['repeats']} interleaved rounds); first call with Inductor's caches off; gradients against "
            "the uncompiled model (max abs diff / largest gradient entry).", "",
            "| model | tokens | dtype | " + " | ".join(configs) + " | " + " | ".join(f"{c} vs uncompiled" for c in FA_CONFIGS)
            + " | first call s (" + " / ".join(configs) + ") | grad diff (" + " / ".join(configs[1:]) + ") |",
            "|---|---:|---|" + "---:|" * (len(configs) + len(FA_CONFIGS)) + "---|---|"]
    for row in report["rows"]:
        c = row["configs"]
        out.append(
            f"| {row['family']} | {row['tokens']} | {row['dtype']} | "
            + " | ".join(f"{c[n]['median_s']:.3f}" for n in configs) + " | "
            + " | ".join(f"**{c[n]['vs_uncompiled']:.2f}×**" for n in FA_CONFIGS) + " | "
            + " / ".join(f"{c[n]['first_call_s']:.1f}" for n in configs) + " | "
            + " / ".join(f"{c[n]['max_grad_diff_rel']:.1e}" for n in configs[1:]) + " |")
    for pair in report.get("pairs", []):
        out += ["", f"## A/B: {pair['family']}, {pair['tokens']} tokens, each config beside the uncompiled model", "",
                "Each compiled config and the uncompiled model alone in a fresh forked child, timed interleaved "
                "(medians of 7 rounds after 2 warm-ups; the samples in the JSON).", "",
                "| config | uncompiled s | config s | vs uncompiled |", "|---|---:|---:|---:|"]
        for name, c in pair["configs"].items():
            out.append(f"| {name} | " + (f"{c['error']} | | |" if "error" in c else
                       f"{c['uncompiled']['median_s']:.3f} | {c[name]['median_s']:.3f} | "
                       f"**{_ab_ratio(c, name):.2f}×** |"))
    out += ["", "## Peak memory of one step, and the first call in a fresh process", "",
            "Each config in its own forked child: one compiling step (its time is the first call, Inductor's "
            "caches off), then the peak RSS growth of one more step.", "",
            "| model | tokens | " + " | ".join(configs) + " | first call s (" + " / ".join(configs) + ") |",
            "|---|---:|" + "---:|" * len(configs) + "---|"]
    for m in report["memory"]:
        cells = [m["configs"][n].get("error") or f"{or_dash(m['configs'][n]['peak_growth_mib'], 0)} MiB"
                 for n in configs]
        firsts = " / ".join(or_dash(m["configs"][n].get("first_call_s"), 1) for n in configs)
        out.append(f"| {m['family']} | {m['tokens']} | " + " | ".join(cells) + f" | {firsts} |")
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    """Llama fp32 step time against tokens, per config."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in report["rows"] if r["family"] == "llama" and r["dtype"] == "fp32"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in (rows[0]["configs"] if rows else {}):
        ax.plot([r["tokens"] for r in rows], [r["configs"][name]["median_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("forward + backward, s")
    ax.set_title(f"GQA Llama training step — {machine_caption(report['machine'])}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(plt, fig, path)
