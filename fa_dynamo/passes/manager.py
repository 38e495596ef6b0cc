"""Runs the passes in order, each switchable, with the failure policy of DESIGN.md.

A pass that raises leaves the graph exactly as it was before that pass and logs a warning;
in strict mode the error propagates instead.
"""

from __future__ import annotations

import copy
import logging

import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.allreduce.tiling import AllReducePass
from fa_dynamo.passes.attention.fuse import AttentionPass
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.cache_writes import CacheWritePass
from fa_dynamo.passes.offload import OffloadPass

log = logging.getLogger(__name__)

PASSES: list[GraphPass] = [CacheWritePass(), AttentionPass(), AllReducePass(), OffloadPass()]
"""The pass order: cache writes first (a plain rewrite the others need not see), then attention,
whose op the allreduce and offload passes read."""


def run_passes(gm: fx.GraphModule, config: FastAttentionConfig) -> list[PassReport]:
    reports = []
    for graph_pass in PASSES:
        if not graph_pass.enabled(config):
            log.debug("%s: disabled by configuration", graph_pass.name)
            continue
        report = graph_pass.report_type(graph_pass.name)
        snapshot = copy.deepcopy(gm.graph)
        try:
            graph_pass.run(gm, config, report)
            gm.graph.lint()
            gm.recompile()
        except Exception as e:
            if config.strict:
                raise
            gm.graph = snapshot
            gm.recompile()
            report.error = f"{type(e).__name__}: {e}"
            report.sites = [SiteReport(s.where, False, f"the pass failed: {report.error}") for s in report.sites]
            log.warning("%s", report.summary())
        else:
            log.debug("%s", report.summary() if report.sites else f"{graph_pass.name}: no candidate sites")
            for where, why in report.refused:
                log.info("%s not fused at %s: %s", graph_pass.name, where, why)
        reports.append(report)
    headlines = [h for h in (r.headline() for r in reports) if h]
    if headlines:
        log.info("%s", "; ".join(headlines))
    return reports
