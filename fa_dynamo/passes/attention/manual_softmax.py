"""Hand-written softmax → ``aten.softmax``, so the attention matcher sees one softmax node.

Research code often spells the softmax out::

    m = s.amax(-1, keepdim=True)          # or s.max(-1, keepdim=True).values, or no max at all
    e = torch.exp(s - m)
    p = e / e.sum(-1, keepdim=True)       # or e * e.sum(-1, keepdim=True).reciprocal()

The max-subtracted form is exactly softmax's own definition; the plain ``exp / sum`` form equals it
in exact arithmetic and differs only where eager overflows (scores above ~88 in float32, where
eager gives inf/NaN and softmax does not). Rewritten only when every intermediate is private
to the chain (no other user sees ``m``, ``e`` or the sum), so nothing else in the graph changes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx

from fa_dynamo.passes.matching import aten, describe, is_op, normalize_dim, shape


def _last_dim_keepdim(node: fx.Node, rank: int) -> bool:
    """A reduction node over exactly the last dim with ``keepdim=True``."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not keepdim or node.kwargs.get("dtype") is not None:
        return False
    return normalize_dim(dims[0], rank) == rank - 1


def _only_users(node: fx.Node, *users: fx.Node) -> bool:
    return set(node.users) <= set(users)


def _row_max_of(node: Any, scores: fx.Node, rank: int) -> bool:
    """``node`` is the row max of ``scores`` (``amax`` or ``max(...).values``, maybe detached)."""
    if is_op(node, aten.detach, aten.alias):
        node = node.args[0]
    if is_op(node, aten.amax):
        return node.args[0] is scores and _last_dim_keepdim(node, rank)
    if node.op == "call_function" and node.target.__name__ == "getitem" and node.args[1] == 0:
        reduced = node.args[0]
        return is_op(reduced, aten.max) and len(reduced.args) > 1 and reduced.args[0] is scores and _last_dim_keepdim(reduced, rank)
    return False


def _normalizer(p: fx.Node) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """``(exp_node, sum_node, private_nodes)`` when ``p`` is ``e / sum(e)`` or ``e * (1/sum(e))``."""
    if is_op(p, aten.div) and len(p.args) == 2:
        e, total, private = p.args[0], p.args[1], []
    elif is_op(p, aten.mul) and len(p.args) == 2 and is_op(p.args[1], aten.reciprocal):
        e, total, private = p.args[0], p.args[1].args[0], [p.args[1]]
    else:
        return None
    if not (is_op(e, aten.exp) and is_op(total, aten.sum) and total.args[0] is e):
        return None
    rank = len(shape(e) or ())
    if rank < 1 or not _last_dim_keepdim(total, rank):
        return None
    if private and not _only_users(private[0], p):
        return None
    if not (_only_users(e, p, total) and _only_users(total, p, *private)):
        return None
    return e, total, private


def _scores_of(e: fx.Node) -> Optional[fx.Node]:
    """The softmax input behind ``exp``: ``s`` in ``exp(s - max(s))`` or ``exp(s)``."""
    arg = e.args[0]
    rank = len(shape(e) or ())
    if is_op(arg, aten.sub) and len(arg.args) == 2 and isinstance(arg.args[0], fx.Node):
        scores, row_max = arg.args
        if _row_max_of(row_max, scores, rank) and _only_users(arg, e) and _only_users(row_max, arg):
            return scores
    return arg if isinstance(arg, fx.Node) else None


def canonicalize_manual_softmax(gm: fx.GraphModule) -> list[str]:
    """Rewrite every hand-written last-dim softmax in ``gm`` in place; returns where."""
    rewritten = []
    for p in list(gm.graph.nodes):
        found = _normalizer(p)
        if found is None:
            continue
        scores = _scores_of(found[0])
        if scores is None or shape(scores) != shape(p):
            continue
        with gm.graph.inserting_before(p):
            softmax = gm.graph.call_function(aten.softmax.int, (scores, -1))
        softmax.meta = dict(p.meta)
        p.replace_all_uses_with(softmax)
        rewritten.append(describe(p))
    if rewritten:
        gm.graph.eliminate_dead_code()
    return rewritten
