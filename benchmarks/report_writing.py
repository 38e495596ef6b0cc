"""What every suite's report shares: the provenance lines, target wording, plotting setup, files.

Each suite renders its own tables; these pieces keep the reports saying the same things the
same way (which machine, which command, how loaded, met or missed by how much) and write
``<stem>.json`` and ``<stem>.md`` so that a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from benchmarks.timing import describe_machine


def command_line(prefix: str, argv: list[str]) -> str:
    """The command that reproduces this run, e.g. ``python -m benchmarks op --quick``."""
    return f"{prefix} {shlex.join(argv)}".strip()


def or_dash(x: Optional[float], digits: int = 1) -> str:
    """A number for a table cell, or ``—`` where it was not measured."""
    return "—" if x is None else f"{x:.{digits}f}"


def machine_lines(machine: dict, label: str = "Machine") -> list[str]:
    """Markdown list items naming the machine (``label``: *Machine*, or *Host* beside a GPU) and the date."""
    return [f"- **{label}**: {describe_machine(machine)}", f"- **Date**: {machine['date']}"]


def command_item(command: str, total_s: float) -> str:
    return f"- **Command**: `{command}` (from the repository root; {total_s / 60:.1f} min)"


def load_item(load: dict, cores: int) -> str:
    """How busy other processes kept the cores (``timing.CpuLoad``): how far to trust the timings."""
    return (f"- **Background load**: other processes kept {or_dash(load.get('other_processes_cores_avg'), 2)} "
            f"of {cores} cores busy on average (from /proc/stat; timings are noisier the larger this is)")


def missed_by(measured: float, required: float, digits: int = 0) -> str:
    """How far a ratio fell short of its target, e.g. ``missed by 20%``."""
    return f"missed by {(1 - measured / required) * 100:.{digits}f}%"


def pyplot():
    """``matplotlib.pyplot`` drawing to files (Agg), or None (said on stderr) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return None
    return plt


def save_figure(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(stem: Path, report: dict, markdown: str) -> None:
    """``stem.json`` (the whole report) and ``stem.md``, each replaced whole or not at all."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(stem.with_name(stem.name + ".json"), json.dumps(report, indent=1, default=str) + "\n")
    _write_atomic(stem.with_name(stem.name + ".md"), markdown)
