"""``fa_dynamo.explain``: what the backend would fuse in a model, and why not where it won't."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from fa_dynamo.backend import FastAttentionBackend
from fa_dynamo.passes.base import SiteReport


@dataclass
class ExplainReport:
    """Every candidate site of every compiled graph, per pass."""

    sites: list[SiteReport] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)  # the pass of each site
    graphs: int = 0
    errors: list[str] = field(default_factory=list)  # passes that failed on a whole graph

    @property
    def fused(self) -> int:
        return sum(s.fused for s in self.sites)

    def __str__(self) -> str:
        lines = [f"fa_dynamo.explain: {self.graphs} graph(s), {self.fused}/{len(self.sites)} site(s) fused"]
        rows = [("pass", "site", "fused", "mask", "kernel", "reason")]
        rows += [(p, s.where, "yes" if s.fused else "no", s.mask, s.kernel, s.reason) for p, s in zip(self.passes, self.sites)]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def explain(model_or_fn: Callable, *args: Any, options: Optional[dict] = None, **kwargs: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with the backend, run it once on the inputs, and report.

    ``options`` are backend options (as in ``torch.compile(..., options=...)``); the rest of
    the graph runs eagerly (``inner="eager"``) so explaining is quick.
    """
    backend = FastAttentionBackend({**(options or {}), "inner": "eager"})
    compiled = torch.compile(model_or_fn, backend=backend)
    compiled(*args, **kwargs)
    report = ExplainReport(graphs=len(backend.reports))
    for graph_reports in backend.reports:
        for pass_report in graph_reports:
            report.sites.extend(pass_report.sites)
            report.passes.extend([pass_report.name] * len(pass_report.sites))
            if pass_report.error:
                report.errors.append(f"{pass_report.name}: {pass_report.error}")
    return report
