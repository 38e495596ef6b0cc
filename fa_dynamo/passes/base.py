"""The shape every pass has: a name, a switch, and a report of what it did and refused."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig

log = logging.getLogger(__name__)


@dataclass
class SiteReport:
    """One candidate site: where it is, whether it was rewritten, and why not."""

    where: str
    fused: bool
    reason: str = ""  # empty when fused
    mask: str = ""  # the mask kind the op received (attention pass)
    kernel: str = ""


@dataclass
class PassReport:
    """What one pass did to one graph: sites rewritten and sites refused, with reasons."""

    name: str
    sites: list[SiteReport] = field(default_factory=list)
    error: str = ""

    @property
    def fused(self) -> tuple[str, ...]:
        """Where the rewritten sites are (read-only: passes append to ``sites``)."""
        return tuple(s.where for s in self.sites if s.fused)

    @property
    def refused(self) -> tuple[tuple[str, str], ...]:
        """``(where, why)`` of every site left alone."""
        return tuple((s.where, s.reason) for s in self.sites if not s.fused)

    def headline(self) -> str:
        """The pass's part of the one log line per graph ("" when it found no site)."""
        return f"{self.name}: {len(self.fused)}/{len(self.sites)} rewritten" if self.sites else ""

    def summary(self) -> str:
        head = f"{self.name}: fused {len(self.fused)} of {len(self.fused) + len(self.refused)} candidate site(s)"
        if self.error:
            return f"{self.name}: failed ({self.error}); graph left unchanged"
        if self.refused:
            head += "; not fused: " + "; ".join(f"{where}: {why}" for where, why in self.refused)
        return head


class GraphPass:
    """Rewrites a pre-dispatch ATen ``GraphModule`` in place and reports on it.

    Subclasses set ``name`` and implement ``enabled`` and ``run``. A pass that raises is
    undone by the pass manager (see ``fa_dynamo.passes.manager``).
    """

    name = "pass"
    report_type = PassReport

    def enabled(self, config: FastAttentionConfig) -> bool:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        raise NotImplementedError
