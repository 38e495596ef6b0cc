"""KV-cache writes stay in place: ``cache.index_copy_(dim, positions, new)`` → ``index_put_``.

A static cache (transformers' ``StaticCache``) writes each step's keys and values with
``index_copy_``. Functionalization turns that into an out-of-place ``index_copy`` (a copy of the
whole cache) and a ``copy_`` back into the input (a second one), and Inductor's re-inplacing
knows ``index_put`` but not ``index_copy``: measured here, the two copies cost more than the
attention over a half-filled 32K cache. ``x.index_copy_(d, i, s)`` is ``x[(:,) * d + (i,)] = s``,
which functionalizes to ``index_put`` and is put back in place. Same values; with repeated
indices both leave which write wins unspecified.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.matching import aten, describe, is_op, normalize_dim, val

log = logging.getLogger(__name__)


class CacheWritePass(GraphPass):
    name = "cache_writes"

    def enabled(self, config: FastAttentionConfig) -> bool:
        return config.attention

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        for node in list(gm.graph.nodes):
            if not is_op(node, aten.index_copy_):
                continue
            where = describe(node)
            x, dim, index, src = node.args[:4]
            index_val = val(index)
            if val(x) is None or index_val is None or index_val.dim() != 1:
                report.sites.append(SiteReport(where, False, "the index is not a 1-D tensor of known shape"))
                continue
            dim = normalize_dim(dim, val(x).dim())
            node.target = aten.index_put_.default
            node.args = (x, [None] * dim + [index], src)
            report.sites.append(SiteReport(where, True))
