"""The shape every pass has: a name, a switch, and a report of what it did and refused."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig

log = logging.getLogger("fa_dynamo")


@dataclass
class PassReport:
    """What one pass did to one graph: sites rewritten and sites refused, with reasons."""

    name: str
    fused: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    error: str = ""

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

    def enabled(self, config: FastAttentionConfig) -> bool:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        raise NotImplementedError
