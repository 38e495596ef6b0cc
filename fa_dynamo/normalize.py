"""Dynamo graph (torch IR) → pre-dispatch ATen graph, where the passes match.

``make_fx(..., pre_dispatch=True)`` traces above autograd, as ``torch.export`` does: matmul,
softmax, dropout and casts stay whole ops (nothing is decomposed into its backward-ready
pieces yet), while the many Python spellings of each (``@``, ``torch.matmul``,
``Tensor.matmul``; ``F.softmax``, ``Tensor.softmax``...) collapse to one ATen op. Tracing
reuses Dynamo's fake tensors and shape environment, so symbolic sizes stay symbolic and
guards added here reach Dynamo.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx


def placeholder_values(gm: fx.GraphModule) -> list:
    """Dynamo's example values for the graph inputs, in order, as fakes of the compile's mode.

    (Dynamo's own trace and the backend's compile use two fake modes over one shape
    environment; make_fx traces in the latter, so the inputs are converted to it here.)
    """
    mode = torch._guards.detect_fake_mode()
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if value is None:
            raise RuntimeError(f"graph input {node.name} carries no example value")
        if mode is not None and isinstance(value, FakeTensor) and value.fake_mode is not mode:
            value = mode.from_tensor(value)
        values.append(value)
    return values


def to_pre_dispatch_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Retrace ``gm`` into pre-dispatch ATen with the same inputs and outputs.

    The graph is run through an ``fx.Interpreter`` under ``preserve_node_meta`` so each ATen
    node keeps the user's stack trace and module path: logs can point at model source lines.
    """

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    args = placeholder_values(gm)
    _reuse_item_symbols(gm, args)
    mode = torch._guards.detect_fake_mode(args)
    with torch._dynamo.utils.preserve_rng_state(), fx_traceback.preserve_node_meta(), mode or nullcontext():
        # "real": the inputs are already fakes of the compile's mode; converting them again
        # would drop what they carry (symbolic sizes are kept either way, memoized items not).
        return make_fx(run, pre_dispatch=True, tracing_mode="real" if mode else "symbolic")(*args)


def _reuse_item_symbols(gm: fx.GraphModule, args: list) -> None:
    """Let ``x.item()`` on a graph input retrace to the symbol Dynamo already gave it.

    Under ``dynamic=True`` Dynamo passes Python floats (a module's dropout ``p``, an
    embedding's ``norm_type``) as 0-dim tensors read back with ``.item()``; its trace gave
    each a symbol with a hint. Memoizing that symbol on the fake input makes the retrace use
    it too, instead of failing on a data-dependent value.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node in gm.graph.nodes:
        if node.op != "call_method" or node.target != "item" or node.args[0].op != "placeholder":
            continue
        fake = args[placeholders.index(node.args[0])]
        symbol = node.meta.get("example_value")
        if isinstance(fake, torch.Tensor) and getattr(fake, "item_memo", None) is None and symbol is not None:
            fake.item_memo = symbol
