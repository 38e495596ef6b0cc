"""Dynamo graph (torch IR) → pre-dispatch ATen graph, where the passes match.

``make_fx(..., pre_dispatch=True)`` traces above autograd, as ``torch.export`` does: matmul,
softmax, dropout and casts stay whole ops (nothing is decomposed into its backward-ready
pieces yet), while the many Python spellings of each (``@``, ``torch.matmul``,
``Tensor.matmul``; ``F.softmax``, ``Tensor.softmax``...) collapse to one ATen op. Tracing
reuses Dynamo's fake tensors and shape environment, so symbolic sizes stay symbolic and
guards added here reach Dynamo.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx


def placeholder_values(gm: fx.GraphModule) -> list:
    """Dynamo's fake example values for the graph inputs, in order."""
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if value is None:
            raise RuntimeError(f"graph input {node.name} carries no example value")
        values.append(value)
    return values


def to_pre_dispatch_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Retrace ``gm`` into pre-dispatch ATen with the same inputs and outputs.

    The graph is run through an ``fx.Interpreter`` under ``preserve_node_meta`` so each ATen
    node keeps the user's stack trace and module path: logs can point at model source lines.
    """

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    with torch._dynamo.utils.preserve_rng_state(), fx_traceback.preserve_node_meta():
        return make_fx(run, pre_dispatch=True, tracing_mode="symbolic")(*placeholder_values(gm))
