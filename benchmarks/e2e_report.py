"""The end-to-end suite's verdicts and rendering: prefill targets met or missed, markdown, plot.

Everything here reads the report dict ``bench_e2e_cpu.main`` builds; nothing here measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from benchmarks.e2e_models import CONFIGS, FA_CONFIGS
from benchmarks.report_writing import command_item, load_item, machine_lines, missed_by, or_dash, pyplot, save_figure
from benchmarks.timing import machine_caption

TARGET_VS_EAGER, TARGET_VS_INDUCTOR = 1.3, 1.0
PREFILL_TARGETS = (("eager", TARGET_VS_EAGER), ("inductor", TARGET_VS_INDUCTOR))  # (peer, speedup required)


def fa_missed(prefill: dict) -> Optional[str]:
    """The fastattention config that missed a prefill target at this length, if any."""
    for name in FA_CONFIGS:
        row = prefill["configs"].get(name, {})
        for peer, target in PREFILL_TARGETS:
            s = row.get(f"speedup_vs_{peer}")
            if s is not None and s < target:
                return name
    return None


def targets(report: dict) -> list[dict]:
    """Per model, length and fastattention config: speedups against the targets, met or missed by how much."""
    rows = []
    for fam in report["families"]:
        comp = {}
        for c in ("inductor", *FA_CONFIGS):
            times = [p["configs"][c]["compile_s"] for p in fam["prefill"] if "compile_s" in p["configs"].get(c, {})]
            comp[c] = sum(times) if times else None
        for p in fam["prefill"]:
            for name in FA_CONFIGS:
                row = p["configs"].get(name)
                if row is None:
                    continue
                out = {"family": fam["family"], "length": p["length"], "config": name,
                       "compile_s": comp[name], "inductor_compile_s": comp["inductor"]}
                for peer, target in PREFILL_TARGETS:
                    s = row.get(f"speedup_vs_{peer}")
                    out[f"vs_{peer}"] = s
                    out[f"vs_{peer}_status"] = (
                        "not measured" if s is None else "met" if s >= target else missed_by(s, target)
                    )
                rows.append(out)
    return rows


def _cell_status(row: dict) -> str:
    return row.get("skipped") or row.get("error") or ""


def _sites(row: dict) -> str:
    s = row.get("fa_sites")
    if not s:
        return ""
    return f"{s['fused']}/{s['candidates']}" + "".join(f" (pass failed: {e})" for e in s["pass_errors"][:1])


def _ok(row: dict) -> str:
    if "outputs_ok" not in row:
        return "ref"
    return f"{row['max_abs_diff']:.1e} {'ok' if row['outputs_ok'] else '**WRONG**'}"


def _row(lead: str, r: dict, measured_key: str, cells: Callable[[dict], str]) -> str:
    """A prefill or decode table row: the measured cells, or the recorded skip / error and blanks."""
    if measured_key not in r:
        return f"| {lead} | {_cell_status(r)} | | | | | | | | |"
    return f"| {lead} | {cells(r)} |"


def _prefill_cells(r: dict) -> str:
    return (f"{r['median_ms']:.0f} | {r['tokens_per_s']:.0f} | {or_dash(r.get('speedup_vs_eager'), 2)} | "
            f"{or_dash(r.get('speedup_vs_inductor'), 2)} | {r['first_call_s']:.1f} | {or_dash(r.get('compile_s'), 1)} | "
            f"{r['graphs_compiled']} | {_sites(r)} | {_ok(r)}")


def _decode_cells(r: dict) -> str:
    return (f"{r['tokens_per_s']:.1f} | {r['median_step_ms']:.1f} | {or_dash(r.get('speedup_vs_eager'), 2)} | "
            f"{or_dash(r.get('compile_s'), 1)} | {r['graphs_compiled']} | {r['graphs_compiled_timed_run']} | "
            f"{_sites(r)} | {_ok(r)} | {r.get('same_tokens', 'ref')}")


def markdown(report: dict) -> str:
    m, plan = report["machine"], report["plan"]
    lines = [
        "# fa_dynamo end to end — transformers models on CPU",
        "",
        *machine_lines(m),
        command_item(report["command"], report["total_s"]),
        load_item(report["load"], m["cores"]),
        f"- **Models**: {', '.join(report['families_requested'])}; {plan['layers']} layers, hidden {plan['hidden']}, "
        f"{plan['heads']} heads (Llama/Mistral GQA {plan['heads']}/{plan['kv_heads']}), vocabulary {plan['vocab']}, "
        f"Mistral sliding window {plan['window']}; random weights (seed 0), fp32, batch 1, eval",
        "- **Configurations**: " + "; ".join(f"`{c}` = {CONFIGS[c].label}" for c in report["configs"]),
        "",
        "Prefill: decoders compute last-token logits (`logits_to_keep=1`), BERT its hidden states. Median of "
        f"{plan['repeats']} timed calls after a first call, configurations interleaved round-robin. *compile s* = "
        "first call − median at that length; *graphs* = graphs Dynamo compiled during the first call (0: the "
        "dynamic graph was reused); *diff* = max abs difference from eager's output (tolerance "
        f"{report['rel_tol']:g} × max |eager|); *fa sites* = attention sites fused / found by fa_dynamo.",
        "",
        "## Prefill",
        "",
        "| model | tokens | config | median ms | tokens/s | vs eager | vs Inductor | first call s | compile s | graphs | fa sites | diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fam in report["families"]:
        for p in fam["prefill"]:
            for name, r in p["configs"].items():
                lines.append(_row(f"{fam['family']} | {p['length']} | {name}", r, "median_ms", _prefill_cells))
    lines += [
        "",
        "## Decode",
        "",
        "After an uncompiled prefill of the prompt, one-token steps with a `DynamicCache`, fed eager's greedy "
        "tokens. *graphs* = graphs compiled over the first run's steps (1–2 means no per-step recompiles; "
        "*timed run* must be 0); *same tokens* = every step's argmax equals eager's.",
        "",
        "| model | prompt + steps | config | tokens/s | median step ms | vs eager | compile s | graphs | timed run | fa sites | diff | same tokens |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for fam in report["families"]:
        d = fam.get("decode")
        if not d:
            continue
        for name, r in d["configs"].items():
            lines.append(_row(f"{fam['family']} | {d['prompt']} + {d['steps']} | {name}", r, "tokens_per_s", _decode_cells))
    if any(fam["memory"] for fam in report["families"]):
        lines += [
            "",
            "## Peak memory (prefill)",
            "",
            "One process per model and configuration (forked from a fresh subprocess); peak RSS of one prefill above the RSS before it (MiB; "
            "after a compiling call at the shortest length). * = the call compiled (a new graph).",
            "",
            "| model | config | " + " | ".join(f"{n} tokens" for n in plan["lengths"]) + " |",
            "|---|---|" + "---:|" * len(plan["lengths"]),
        ]
        for fam in report["families"]:
            for name, mem in fam["memory"].items():
                cells = []
                for n in plan["lengths"]:
                    c = mem.get(str(n), {})
                    cells.append(f"{max(0.0, c['peak_mib']):.0f}{'*' if c['includes_compile'] else ''}" if "peak_mib" in c else _cell_status(c))
                lines.append(f"| {fam['family']} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Targets",
        "",
        f"Prefill end to end: fastattention ≥ {TARGET_VS_EAGER}× the eager-attention model and ≥ {TARGET_VS_INDUCTOR}× "
        "Inductor, measured in this run; compile time (all prefill lengths) next to Inductor's.",
        "",
        f"| model | tokens | config | vs eager (≥ {TARGET_VS_EAGER}) | | vs Inductor (≥ {TARGET_VS_INDUCTOR}) | | compile s | Inductor compile s |",
        "|---|---:|---|---:|---|---:|---|---:|---:|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['family']} | {t['length']} | {t['config']} | {or_dash(t['vs_eager'], 2)} | {t['vs_eager_status']} | "
            f"{or_dash(t['vs_inductor'], 2)} | {t['vs_inductor_status']} | {or_dash(t['compile_s'], 1)} | {or_dash(t['inductor_compile_s'], 1)} |"
        )
    missed = [t for t in report["targets"] if "missed" in t["vs_eager_status"] + t["vs_inductor_status"]]
    lines += ["", f"Targets missed: {len(missed)} of {2 * len(report['targets'])} comparisons."]
    prof = report.get("profile")
    if prof:
        lines += ["", "## Bottleneck (profile of the first missed case)", "", prof["note"]]
        if prof.get("top_ops"):
            lines += ["", "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |" for o in prof["top_ops"]]
    wrong = [
        f"{fam['family']} {where} {name}"
        for fam in report["families"]
        for where, rows in [(f"prefill {p['length']}", p["configs"]) for p in fam["prefill"]]
        + ([("decode", fam["decode"]["configs"])] if fam.get("decode") else [])
        for name, r in rows.items()
        if r.get("outputs_ok") is False
    ]
    lines += ["", "Outputs beyond tolerance (their timings are not to be trusted): " + ("; ".join(wrong) or "none") + "."]
    lines += ["", "Plot: `e2e_cpu.png` (prefill latency vs length per model; decode tokens/s).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    """Prefill latency against length, a panel per model; decode tokens/s as bars."""
    plt = pyplot()
    if plt is None:
        return False
    fams = report["families"]
    fig, axes = plt.subplots(1, len(fams) + 1, figsize=(4 * (len(fams) + 1), 4))
    for ax, fam in zip(axes, fams):
        for name in report["configs"]:
            pts = [(p["length"], p["configs"][name]["median_ms"]) for p in fam["prefill"] if "median_ms" in p["configs"].get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([p["length"] for p in fam["prefill"]], [str(p["length"]) for p in fam["prefill"]])
        ax.set_title(f"{fam['family']} prefill", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("median ms (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    decs = [f for f in fams if f.get("decode")]
    width = 0.8 / max(1, len(report["configs"]))
    for i, name in enumerate(report["configs"]):
        ys = [f["decode"]["configs"].get(name, {}).get("tokens_per_s", 0) for f in decs]
        ax.bar([j + i * width for j in range(len(decs))], ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(decs))], [f["family"] for f in decs])
    ax.set_title("decode tokens/s", fontsize=9)
    fig.suptitle(machine_caption(report["machine"]), fontsize=9)
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True


