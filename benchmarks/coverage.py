"""Attention coverage on the model corpus: fa_dynamo against Inductor's ``fuse_attention``.

    python -m benchmarks.coverage                         # every family × case, both attentions, 25-60 min
    python -m benchmarks.coverage --families llama,bloom  # a subset
    python -m benchmarks.coverage --attn sdpa             # the models as transformers ships them only
    python -m benchmarks.coverage --no-inductor           # fa_dynamo only, 6-10 minutes
    python -m benchmarks.coverage --inductor-on sdpa      # Inductor on the SDPA models only

For every case of ``tests/models/corpus.py`` (tiny transformers models, random weights, fp32,
under ``torch.no_grad()``), built with ``attn_implementation="eager"`` (hand-written attention)
and ``"sdpa"`` (transformers' default: SDPA calls fed with the masks ``masking_utils`` builds):

* **sites**: SDPA calls, and softmaxes over the last dim whose probabilities reach a matmul,
  counted in the pre-dispatch ATen graphs the attention pass sees, before it rewrites them;
* **fa_dynamo**: ``fa_dynamo.attention`` calls after the pass, compiled with
  ``FastAttentionBackend({"strict": False, "inner": "eager"}, keep_graphs=True)``;
* **Inductor**: ``torch._dynamo.utils.counters["inductor"]["fuse_attention"]`` after a default
  ``torch.compile(model)`` of the same case (counters cleared first; AOTAutograd's cache off so
  its joint-graph passes, and with them the counter, always run). On SDPA models each site
  already is an SDPA call, which Inductor keeps as it is, with the mask transformers built;
* **max |Δ|**: the largest absolute difference to eager on the valid (non-padding) positions;
* **masks of fused sites**: what reached the op: ``band`` (a mask lifted to ``lo ≤ j − i ≤ hi``,
  never materialized), ``mask[keys]``/``bias[keys]`` (one row per batch/head, e.g. key padding),
  ``mask[S×S]``/``bias[S×S]`` (a dense query × key tensor), ``softcap``; ``none`` = unmasked.

Every refused site is listed with the pass's reason and, once per reason and family, the part of
the before-graph between Q·Kᵀ and the softmax together with the mask-building nodes.
Results: ``benchmarks/results/coverage.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import torch

from fa_dynamo.passes.matching import op_arguments

from benchmarks.timing import CpuLoad, describe_machine, machine_info
from tests.models.corpus import ATTENTION_IMPLEMENTATIONS, FAMILIES, all_case_ids, build_case, build_model
from tests.models.measure import ATTENTION_OP, Measured, eager_output, measure_fastattention, measure_inductor

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


# --- what reached the op -------------------------------------------------------------------------


def _last2(node) -> Optional[tuple]:
    """The (query, key) sizes of a mask/bias operand; nodes the pass added carry no value, so
    the sizes are read off their inputs."""
    if not isinstance(node, torch.fx.Node):
        return None
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        s = (1, 1) + tuple(v.shape)
        return s[-2:]
    sizes = [s for s in (_last2(a) for a in node.all_input_nodes) if s is not None]
    return tuple(max(d) for d in zip(*sizes)) if sizes else None


def _kind(node, name: str) -> Optional[str]:
    if node is None:
        return None
    s = _last2(node)
    if s is None:
        return f"{name}[?]"
    return f"{name}[keys]" if s[0] == 1 else f"{name}[S×S]"


def fused_operands(after: torch.fx.GraphModule) -> Counter:
    """For each fa_dynamo.attention call: band / mask / bias / softcap, as one label."""
    labels: Counter = Counter()
    for n in after.graph.nodes:
        if n.target is not ATTENTION_OP:
            continue
        args = op_arguments(n)  # the passes emit the op by argument name
        parts = []
        if args["min_offset"] is not None or args["max_offset"] is not None:
            parts.append("band")
        parts += [p for p in (_kind(args["mask"], "mask"), _kind(args["bias"], "bias")) if p]
        if args["softcap"]:
            parts.append("softcap")
        labels["+".join(parts) or "none"] += 1
    return labels


# --- running -----------------------------------------------------------------------------------


def run_case(family: str, case_name: str, model, inductor: bool, attn: str = "eager") -> tuple[dict, Measured]:
    case = build_case(family, case_name, model=model)
    expected = eager_output(case)
    t0 = time.perf_counter()
    m = measure_fastattention(case, expected=expected)
    row = {
        "attn": attn,
        "family": family,
        "case": case_name,
        "sites": m.sites,
        "fa_fused": m.fused,
        "fa_max_diff": m.max_diff,
        "graphs": m.graphs,
        "fa_compile_run_s": round(time.perf_counter() - t0, 2),
        "masks": dict(sum((fused_operands(after) for after in m.afters), Counter())),
        "refused": [{"where": w, "why": y} for w, y in m.refused],
        "pass_errors": m.errors,
        "equal_to_eager": bool(
            m.actual.shape == m.expected.shape
            and torch.allclose(m.actual[m.valid], m.expected[m.valid], atol=1e-4, rtol=1e-4)
        ),
    }
    if inductor:
        t0 = time.perf_counter()
        try:
            row["inductor_fused"], row["inductor_max_diff"] = measure_inductor(case, expected=expected)
        except Exception as e:  # a peer's failure is a result, not a crash of the benchmark
            row["inductor_fused"], row["inductor_error"] = None, f"{type(e).__name__}: {e}"
        row["inductor_compile_run_s"] = round(time.perf_counter() - t0, 2)
    return row, m


def git_state() -> dict:
    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--", "fa_dynamo").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_fa_dynamo": dirty}


# --- report ------------------------------------------------------------------------------------


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def _diff(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def totals(rows: list[dict]) -> dict:
    sites = sum(r["sites"] for r in rows)
    fused = sum(r["fa_fused"] for r in rows)
    ind_rows = [r for r in rows if r.get("inductor_fused") is not None]
    return {
        "cases": len(rows),
        "sites": sites,
        "fa_fused": fused,
        "fa_fused_fraction": fused / sites if sites else None,
        "inductor_fused": sum(r["inductor_fused"] for r in ind_rows) if ind_rows else None,
        "inductor_sites": sum(r["sites"] for r in ind_rows),
        "inductor_fused_fraction": (
            sum(r["inductor_fused"] for r in ind_rows) / sum(r["sites"] for r in ind_rows) if ind_rows else None
        ),
        "cases_equal_to_eager": sum(r["equal_to_eager"] for r in rows),
        "fused_with_dense_operand": sum(n for r in rows for k, n in r["masks"].items() if "[S×S]" in k),
        "fa_max_diff": max(r["fa_max_diff"] for r in rows),
        "families_at_zero": sorted(
            f for f in {r["family"] for r in rows} if sum(r["fa_fused"] for r in rows if r["family"] == f) == 0
        ),
    }


def markdown(report: dict) -> str:
    out = _header(report)
    for attn, tot in report["totals"].items():
        out += _section(attn, [r for r in report["rows"] if r["attn"] == attn], tot,
                        [s for s in report["snippets"] if s.get("attn", "eager") == attn])
    return "\n".join(out) + "\n"


_ATTN_TITLES = {"eager": "Models with eager attention (`attn_implementation=\"eager\"`)",
                "sdpa": "Models as transformers ships them (`attn_implementation=\"sdpa\"`: SDPA calls)"}


def _header(report: dict) -> list:
    return [
        "# fa_dynamo attention coverage — model corpus",
        "",
        f"- **Machine**: {report['machine_line']}",
        f"- **Date**: {report['machine']['date']}",
        f"- **Command**: `{report['command']}` (run from the repository root)",
        f"- **Code**: commit {report['git']['commit']}"
        + (f", with uncommitted changes in {len(report['git']['dirty_fa_dynamo'])} file(s) under fa_dynamo/"
           if report["git"]["dirty_fa_dynamo"] else ", fa_dynamo/ clean"),
        f"- **Run time**: {report['load']['wall_s']:.0f} s; other processes kept "
        f"{report['load']['other_processes_cores_avg'] or 0:.2f} cores busy on average",
        "",
        "Tiny transformers models (2 layers, hidden 64, 4 heads, vocabulary 128, random weights with "
        "init std 0.2, no dropout), fp32, batch 2, 37 tokens (row 1 of the batch padded "
        "by 7 in the padded cases), `torch.no_grad()`, built with eager attention and, where transformers "
        "has it, as shipped (SDPA). Built by `tests/models/corpus.py`; the same cases "
        "are asserted by `tests/models/test_corpus.py`.",
        "",
        "**Sites**: SDPA calls, and softmaxes over the last dim feeding a matmul, in the pre-dispatch ATen "
        "graphs before the pass. **fa_dynamo**: `fa_dynamo.attention` calls after it. **Inductor**: its "
        "`counters[\"inductor\"][\"fuse_attention\"]` after a default `torch.compile` of the same case "
        "(on SDPA models every site already is an SDPA call: Inductor keeps it, with the mask transformers "
        "built). **max |Δ|**: against the uncompiled model on the valid positions. **masks**: what reached "
        "the op per fused site (`band`: lifted, never materialized; `[keys]`: one row per batch/head, e.g. "
        "key padding; `[S×S]`: a dense query × key tensor).",
    ]


def _section(attn: str, rows: list, tot: dict, snippets: list) -> list:
    has_ind = tot["inductor_fused"] is not None
    out = [
        "",
        f"# {_ATTN_TITLES[attn]}",
        "",
        "## Totals",
        "",
        f"- **fa_dynamo**: {tot['fa_fused']} / {tot['sites']} sites fused = **{_pct(tot['fa_fused'], tot['sites'])}**",
    ]
    if has_ind:
        out.append(
            f"- **Inductor `fuse_attention`**: {tot['inductor_fused']} / {tot['inductor_sites']} = "
            f"**{_pct(tot['inductor_fused'], tot['inductor_sites'])}**"
        )
    out += [
        f"- **Outputs equal to eager** (atol = rtol = 1e-4): {tot['cases_equal_to_eager']} / {tot['cases']} cases; "
        f"largest |Δ| {tot['fa_max_diff']:.1e}",
        f"- **Families with no site fused**: {', '.join(tot['families_at_zero']) or 'none'}",
        f"- **Fused sites still given a dense S×S mask or bias**: {tot['fused_with_dense_operand']} of "
        f"{tot['fa_fused']} (the rest: a lifted band, [keys] rows, or nothing)",
        "",
        "## By family",
        "",
        "| family | what it exercises | cases | sites | fa_dynamo | "
        + ("Inductor | " if has_ind else "") + "max \\|Δ\\| |",
        "|---|---|---:|---:|---:|" + ("---:|" if has_ind else "") + "---:|",
    ]
    by_fam: dict[str, list] = defaultdict(list)
    for r in rows:
        by_fam[r["family"]].append(r)
    for fam, rs in by_fam.items():
        s, f = sum(r["sites"] for r in rs), sum(r["fa_fused"] for r in rs)
        line = f"| {fam} | {FAMILIES[fam].note} | {len(rs)} | {s} | {f} ({_pct(f, s)}) | "
        if has_ind:
            i = sum(r.get("inductor_fused") or 0 for r in rs)
            line += f"{i} ({_pct(i, s)}) | "
        line += f"{_diff(max(r['fa_max_diff'] for r in rs))} |"
        out.append(line)
    out += [
        "",
        "## By case",
        "",
        "| family | case | sites | fa_dynamo | " + ("Inductor | " if has_ind else "")
        + "max \\|Δ\\| fa_dynamo | " + ("max \\|Δ\\| Inductor | " if has_ind else "")
        + "graphs | masks of fused sites |",
        "|---|---|---:|---:|" + ("---:|" if has_ind else "") + "---:|" + ("---:|" if has_ind else "") + "---:|---|",
    ]
    for r in rows:
        masks = ", ".join(f"{k} ×{v}" for k, v in sorted(r["masks"].items())) or "–"
        line = f"| {r['family']} | {r['case']} | {r['sites']} | {r['fa_fused']} | "
        if has_ind:
            line += f"{'error' if r.get('inductor_fused') is None else r['inductor_fused']} | "
        line += f"{_diff(r['fa_max_diff'])}{'' if r['equal_to_eager'] else ' **≠ eager**'} | "
        if has_ind:
            line += f"{_diff(r.get('inductor_max_diff'))} | "
        line += f"{r['graphs']} | {masks} |"
        out.append(line)

    refusals: dict[str, list] = defaultdict(list)
    for r in rows:
        for ref in r["refused"]:
            refusals[ref["why"]].append((r["family"], r["case"], ref["where"]))
    out += ["", "## Refused sites, by reason", ""]
    if not refusals:
        out.append("None.")
    for why, where in sorted(refusals.items(), key=lambda kv: -len(kv[1])):
        fams = Counter(f for f, _, _ in where)
        out.append(f"- **{why}** — {len(where)} site(s): " + ", ".join(f"{f} ×{n}" for f, n in fams.items()))
    errors = [(r["family"], r["case"], e) for r in rows for e in r["pass_errors"]]
    inductor_errors = [(r["family"], r["case"], r["inductor_error"]) for r in rows if r.get("inductor_error")]
    if errors:
        out += ["", "## Pass errors (graph left unfused)", ""] + [f"- {f}-{c}: {e}" for f, c, e in errors]
    if inductor_errors:
        out += ["", "## Inductor errors", ""] + [f"- {f}-{c}: {e}" for f, c, e in inductor_errors]
    if snippets:
        out += [
            "",
            "## Refused sites: the graph before the pass",
            "",
            "One site per reason and family: the pre-dispatch ATen nodes the softmax depends on, back to the "
            "Q·Kᵀ matmul (its inputs not followed), mask-building nodes included.",
        ]
        for s in snippets:
            out += ["", f"### {s['family']}-{s['case']}: {s['where']}", "", f"Reason: {s['why']}", ""]
            out += ["```", s["graph"], "```"]
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the Inductor peer")
    parser.add_argument("--attn", choices=("both", *ATTENTION_IMPLEMENTATIONS), default="both",
                        help="transformers' attn_implementation of the models (default: both)")
    parser.add_argument("--inductor-on", choices=("both", *ATTENTION_IMPLEMENTATIONS), default="both",
                        help="the models Inductor is measured on (default: both; --no-inductor: none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "coverage", help="output path without extension")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    families = args.families.split(",") if args.families else list(FAMILIES)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; the corpus has {sorted(FAMILIES)}")

    attns = ATTENTION_IMPLEMENTATIONS if args.attn == "both" else (args.attn,)
    rows, snippets = [], []
    seen_reasons: set = set()
    with CpuLoad() as load:
        for attn in attns:
            for family in families:
                cases = [c for f, c in all_case_ids(attn) if f == family]
                model = build_model(family, attn=attn) if cases else None
                for case_name in cases:
                    inductor = not args.no_inductor and args.inductor_on in ("both", attn)
                    row, m = run_case(family, case_name, model, inductor=inductor, attn=attn)
                    rows.append(row)
                    for where, why in m.refused:
                        if (attn, family, why) not in seen_reasons and where in m.snippets:
                            seen_reasons.add((attn, family, why))
                            snippets.append({"attn": attn, "family": family, "case": case_name, "where": where,
                                             "why": why, "graph": m.snippets[where]})
                    ind = f" inductor {row.get('inductor_fused')}" if inductor else ""
                    print(
                        f"{attn} {family}-{case_name}: sites {row['sites']} fused {row['fa_fused']}{ind} "
                        f"max|Δ| {row['fa_max_diff']:.1e}" + ("" if row["equal_to_eager"] else "  ≠ EAGER"),
                        file=sys.stderr, flush=True,
                    )
    info = machine_info()
    report = {
        "machine": info,
        "machine_line": describe_machine(info),
        "command": ("python -m benchmarks.coverage " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip(),
        "git": git_state(),
        "load": load.as_dict(),
        "totals": {attn: totals([r for r in rows if r["attn"] == attn]) for attn in attns},
        "rows": rows,
        "snippets": snippets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    for attn, tot in report["totals"].items():
        line = f"{attn}: fa_dynamo fused {tot['fa_fused']}/{tot['sites']} ({_pct(tot['fa_fused'], tot['sites'])})"
        if tot["inductor_fused"] is not None:
            ind = _pct(tot["inductor_fused"], tot["inductor_sites"])
            line += f", Inductor {tot['inductor_fused']}/{tot['inductor_sites']} ({ind})"
        print(f"{line}; {tot['cases_equal_to_eager']}/{tot['cases']} cases equal to eager → {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
