"""Dynamo graph (torch IR) → pre-dispatch ATen graph, where the passes match.

``make_fx(..., pre_dispatch=True)`` traces above autograd, as ``torch.export`` does: matmul,
softmax, dropout and casts stay whole ops (nothing is decomposed into its backward-ready
pieces yet), while the many Python spellings of each (``@``, ``torch.matmul``,
``Tensor.matmul``; ``F.softmax``, ``Tensor.softmax``...) collapse to one ATen op. Tracing
reuses Dynamo's fake tensors and shape environment, so symbolic sizes stay symbolic and
guards added here reach Dynamo.

Graphs over tensor subclasses (DTensor) cannot be retraced this way; the backend hands them to
aot_autograd and runs the passes on its forward graph, after ``undo_matmul_decomposition``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


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


def has_tensor_subclass(gm: fx.GraphModule) -> bool:
    """Whether any value in ``gm`` is a tensor subclass (DTensor): the retrace below rejects those."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor) and is_traceable_wrapper_subclass(value):
            return True
    return False


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


def undo_matmul_decomposition(gm: fx.GraphModule) -> int:
    """Turn aot_autograd's spellings of ``matmul`` and ``linear`` back into one node; returns how many.

    Graphs traced below autograd (the forward aot_autograd hands a compiler: DTensor models,
    see ``fa_dynamo.backend``) spell ``a @ b`` of batched operands and ``F.linear(x, w)`` of
    N-D ``x`` as::

        bmm(view(clone(expand(a, [*batch, m, k])), [B, m, k]), view(...(b)...)) → view [*batch, m, n]
        _unsafe_view(mm(view(x, [M, k]), t(w)), [*lead, n])

    (``clone`` only where ``a`` is not contiguous). The passes match ``matmul`` and ``linear``;
    ``matmul(a, b)`` broadcasts the batch dims exactly as the ``expand`` did, so neither rewrite
    changes a value.
    """
    count = 0
    for out in list(gm.graph.nodes):
        if out.op != "call_function" or out.target not in (aten.view.default, aten._unsafe_view.default):
            continue
        product = out.args[0]
        if not (isinstance(product, fx.Node) and len(product.users) == 1):
            continue
        if product.target is aten.bmm.default:
            found = _undo_bmm(out, product)
        elif product.target is aten.mm.default:
            found = _undo_mm(out, product)
        else:
            continue
        if found is None:
            continue
        target, args, decomposition = found
        with gm.graph.inserting_before(out):
            node = gm.graph.call_function(target, args)
        node.meta.update(out.meta)
        out.replace_all_uses_with(node)
        for old in [out, product, *decomposition]:  # users before what they use
            if not old.users:
                gm.graph.erase_node(old)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


aten = torch.ops.aten


def _shape(node) -> list:
    return list(node.meta["val"].shape)


def _undo_bmm(out: fx.Node, bmm: fx.Node):
    operands = [_expanded_operand(arg) for arg in bmm.args[:2]]
    if None in operands or operands[0][1] != operands[1][1] or _shape(out)[:-2] != operands[0][1]:
        return None
    return aten.matmul.default, (operands[0][0], operands[1][0]), operands[0][2] + operands[1][2]


def _expanded_operand(node):
    """``(a, batch, [view, clone?, expand])`` for ``view(clone?(expand(a, [*batch, m, k])), [B, m, k])``, else None."""
    if not (isinstance(node, fx.Node) and node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
            and len(node.users) == 1):
        return None
    chain = [node]
    node = node.args[0]
    if isinstance(node, fx.Node) and node.target is aten.clone.default and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.expand.default and len(node.users) == 1):
        return None
    chain.append(node)
    a, sizes = node.args[0], _shape(node)
    if not isinstance(a, fx.Node) or _shape(a)[-2:] != sizes[-2:]:
        return None
    return a, sizes[:-2], chain


def _undo_mm(out: fx.Node, mm: fx.Node):
    """``linear(x, w)`` for ``_unsafe_view(mm(view(x, [M, k]), t(w)), [*x.shape[:-1], n])``, else None."""
    rows, wt = mm.args
    if not all(isinstance(n, fx.Node) and len(n.users) == 1 for n in (rows, wt)):
        return None
    if rows.target not in (aten.view.default, aten._unsafe_view.default, aten.reshape.default) or wt.target is not aten.t.default:
        return None
    x = rows.args[0]
    if not isinstance(x, fx.Node) or len(_shape(x)) < 3 or _shape(out) != _shape(x)[:-1] + _shape(mm)[-1:]:
        return None
    return aten.linear.default, (x, wt.args[0]), [rows, wt]
