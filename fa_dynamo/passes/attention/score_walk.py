"""The score chain, read: from a softmax's input back to Q·Kᵀ, one typed event per transform.

``walk_scores`` steps back from the softmax one node at a time; each step is one small
recognizer (``_STEPS``) that knows one transform — a cast, a batch-only view, a scalar scale,
a tanh softcap, an added tensor, a masked fill — and returns the node before it and what it
did to the scores as an event (``View``, ``Scale``, ``Softcap``, ``Bias``, ``Fill``), or raises
``NotFusable`` with the reason. ``score_chain.fold_events`` turns the events, in forward order,
into the op's arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo.passes.attention.rewrite import is_metadata_read
from fa_dynamo.passes.attention.site import NotFusable, Scalar
from fa_dynamo.passes.attention.manual_softmax import _row_max_of
from fa_dynamo.passes.matching import (
    ADD, CASTS, DIV, IDENTITIES, MASKED_FILL, MATMULS, MUL, VIEWS, aten, dtype, insert_with_val, is_op,
    is_symbolic_scalar, normalize_dim, python_scalar, round_to, shape, val,
)


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """A batch-only view: from here on the scores have ``node``'s layout."""

    node: fx.Node


@dataclass(frozen=True)
class Scale:
    """``s · factor`` (``power`` 1) or ``s / factor`` (-1); ``factor`` a number, a symbolic
    scalar, or a one-element tensor node (a scale known only at run time)."""

    factor: Any
    power: int

    @property
    def term(self) -> tuple[Any, int]:
        """As the site's scale lists hold it."""
        return self.factor, self.power


@dataclass(frozen=True)
class Softcap:
    """``cap · tanh(s / cap)``."""

    cap: float


@dataclass(frozen=True)
class Bias:
    """``s + tensor``, added at ``node``."""

    tensor: fx.Node
    node: fx.Node


@dataclass(frozen=True)
class Fill:
    """Scores where ``cond`` hides them (where it is True if ``hidden_where_true``, else where it
    is False) replaced by ``value`` (as stored in the scores' dtype), at ``node``."""

    cond: fx.Node
    hidden_where_true: bool
    value: float
    node: fx.Node


ScoreEvent = Union[View, Scale, Softcap, Bias, Fill]
Step = Optional[tuple[fx.Node, Optional[ScoreEvent]]]  # (the node before, the event) or not this transform


# --- the walk ----------------------------------------------------------------------------------


def walk_scores(x: fx.Node, reads: list) -> tuple[list[ScoreEvent], fx.Node, Optional[tuple[fx.Node, fx.Node]]]:
    """Score-chain events from the softmax input ``x`` back to the Q·Kᵀ matmul (in forward
    order), the matmul, and the sink column concatenated to the scores as ``(scores before the
    cat, sink)``. Users that read only metadata go to ``reads``."""
    events: list[ScoreEvent] = []
    node = x
    at_softmax = True  # only casts and views so far: a row-max subtraction or a sink may sit here
    row_max, sink = None, None  # the row max read off ``node`` (its second user) and the sink
    while True:
        if len([u for u in dense_users(node, reads) if u is not row_max]) != 1:
            raise NotFusable(f"the scores ({node.name}) are also used outside the attention")
        row_max = None
        if is_qk_matmul(node):
            break
        if at_softmax and (peeled := _row_max_subtracted(node)) is not None:
            node, row_max = peeled
            continue
        if at_softmax and is_op(node, aten.cat):
            sink = _sink_column(node)
            node, at_softmax = sink[0], False
            continue
        at_softmax = at_softmax and is_op(node, *CASTS, *IDENTITIES, *VIEWS)
        node, event = _step(node)
        if event is not None:
            events.append(event)
    events.reverse()
    return events, node, sink


def _step(node: fx.Node) -> tuple[fx.Node, Optional[ScoreEvent]]:
    """One transform back: the first recognizer that knows ``node``'s op."""
    for recognize in _STEPS:
        step = recognize(node)
        if step is not None:
            return step
    raise NotFusable(f"{node.target} between Q·Kᵀ and softmax is not understood")


# --- one recognizer per transform ---------------------------------------------------------------


def _cast(node: fx.Node) -> Step:
    if not is_op(node, *CASTS):
        return None
    if not (dtype(node) and dtype(node).is_floating_point):
        raise NotFusable("the scores are cast to a non-float dtype")
    if torch.finfo(dtype(node)).eps > torch.finfo(dtype(node.args[0])).eps:
        raise NotFusable(f"the scores are rounded to {dtype(node)} before softmax")
    return node.args[0], None


def _identity(node: fx.Node) -> Step:
    return (node.args[0], None) if is_op(node, *IDENTITIES) else None


def _view(node: fx.Node) -> Step:
    if not is_op(node, *VIEWS):
        return None
    if shape(node)[-2:] != shape(node.args[0])[-2:]:
        raise NotFusable(f"{node.target} reshapes the query/key dims of the scores")
    return node.args[0], View(node)


def _softcap_step(node: fx.Node) -> Step:
    softcap = _softcap(node)
    return None if softcap is None else (softcap[0], Softcap(softcap[1]))


def _scale(node: fx.Node) -> Step:
    factor = scalar_factor(node) or _unit_tensor_factor(node)
    if factor is not None:
        return factor[0], Scale(*factor[1])
    if is_op(node, *MUL, *DIV):
        raise NotFusable(f"the scores are scaled by a tensor ({node.name}), not a scalar")
    return None


def _add(node: fx.Node) -> Step:
    if not is_op(node, *ADD):
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise NotFusable("add with alpha")
    a, b = node.args
    if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):
        raise NotFusable("a scalar is added to the scores")
    if not (_leads_to_scores(a) or _leads_to_scores(b)):
        raise NotFusable(f"no Q·Kᵀ matmul found behind {node.name}: the scores come from an unrecognized op")
    chain, other = (a, b) if _leads_to_scores(a) else (b, a)
    return chain, Bias(other, node)


def _subtract(node: fx.Node) -> Step:
    """``s - t``: ``t``'s negation is the bias."""
    if not (is_op(node, aten.sub) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
            and isinstance(node.args[1], fx.Node) and _leads_to_scores(node.args[0])
            and not _leads_to_scores(node.args[1])):
        return None
    return node.args[0], Bias(_negated(node.args[1], node), node)


def _masked_fill(node: fx.Node) -> Step:
    if not is_op(node, *MASKED_FILL):
        return None
    return node.args[0], Fill(node.args[1], True, _fill_value(node.args[2], dtype(node)), node)


def _where(node: fx.Node) -> Step:
    if not is_op(node, aten.where):
        return None
    cond, a, b = node.args
    if _leads_to_scores(a):
        return a, Fill(cond, False, _fill_value(b, dtype(node)), node)
    return b, Fill(cond, True, _fill_value(a, dtype(node)), node)


# In this order: a softcap ends in a multiplication by its cap, so it is tried before a scale.
_STEPS: tuple[Callable[[fx.Node], Step], ...] = (
    _cast, _identity, _view, _softcap_step, _scale, _add, _subtract, _masked_fill, _where,
)


# --- what the recognizers read -------------------------------------------------------------------


def is_scores_matmul(node: Any) -> bool:
    return is_op(node, *MATMULS) and not (is_op(node, aten.einsum) and len(node.args[1]) != 2)


def is_qk_matmul(node: Any) -> bool:
    """Q·Kᵀ may also be ``baddbmm(bias, q, kᵀ, beta=, alpha=)`` (BLOOM's ALiBi)."""
    return is_scores_matmul(node) or is_op(node, aten.baddbmm)


def _leads_to_scores(node: Any, depth: int = 24) -> bool:
    """Whether walking back through score-chain ops reaches a matmul (picks the chain operand)."""
    while depth > 0 and isinstance(node, fx.Node):
        if is_qk_matmul(node):
            return True
        if not is_op(node, *CASTS, *IDENTITIES, *VIEWS, *MUL, *DIV, *ADD, *MASKED_FILL, aten.tanh, aten.where,
                     aten.sub):
            return False
        if is_op(node, aten.where):
            return _leads_to_scores(node.args[1], depth - 1) or _leads_to_scores(node.args[2], depth - 1)
        if is_op(node, *ADD, *MUL) and isinstance(node.args[1], fx.Node) and _leads_to_scores(node.args[1], depth - 1):
            return True
        node, depth = node.args[0], depth - 1
    return False


def _is_scalar(arg: Any) -> bool:
    return python_scalar(arg) is not None or is_symbolic_scalar(arg)


def scalar_factor(node: fx.Node) -> Optional[tuple[fx.Node, tuple[Scalar, int]]]:
    """``x * c``, ``c * x`` or ``x / c`` with a scalar ``c`` → ``(x, (c, +1 for mul / -1 for div))``."""
    if not is_op(node, *MUL, *DIV) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_op(node, *MUL) and _is_scalar(a):
        a, b = b, a
    if not isinstance(val(a), torch.Tensor) or not _is_scalar(b):
        return None
    return a, (b, 1 if is_op(node, *MUL) else -1)


def _unit_tensor_factor(node: fx.Node) -> Optional[tuple[fx.Node, tuple[fx.Node, int]]]:
    """``x * t``, ``t * x`` or ``x / t`` with a one-element float tensor ``t`` (``torch.sqrt(
    torch.tensor(d))``) → ``(x, (t, ±1))``: a scale known only at run time, applied to q."""
    if not is_op(node, *MUL, *DIV) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_op(node, *MUL) and not _leads_to_scores(a):
        a, b = b, a
    if not (isinstance(b, fx.Node) and isinstance(val(b), torch.Tensor) and val(b).dtype.is_floating_point
            and all(d == 1 for d in val(b).shape) and _leads_to_scores(a) and not _leads_to_scores(b)):
        return None
    return a, (b, 1 if is_op(node, *MUL) else -1)


def dense_users(node: fx.Node, reads: list) -> list[fx.Node]:
    """The users of ``node`` that read its values; those that read only its sizes, dtype or
    device go to ``reads`` (the rewrite points them elsewhere, so the node can die)."""
    reads += [u for u in node.users if is_metadata_read(u)]
    return [u for u in node.users if not is_metadata_read(u)]


def _row_max_subtracted(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """``s - s.max(-1, keepdim=True).values`` (or ``s.amax(-1, keepdim=True)``) → ``(s, the
    reduction reading s)``. Right before softmax it changes nothing: softmax is invariant to a
    per-row constant (a row of -inf gives NaN either way)."""
    if not is_op(node, aten.sub) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    s, m = node.args
    if not isinstance(s, fx.Node) or not isinstance(m, fx.Node) or not _row_max_of(m, s, len(shape(s) or ())):
        return None
    reduce = next((r for r in s.users if is_op(r, aten.amax, aten.max)), None)
    return None if reduce is None else (s, reduce)


def _sink_column(cat: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``cat([s, sinks.reshape(1, -1, 1, 1).expand(B, -1, Sq, 1)], -1)`` → ``(s, the sinks)``:
    one extra key whose logit depends only on the batch/head (gpt-oss's attention sinks)."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = len(shape(cat) or ())
    if normalize_dim(dim, rank) != rank - 1 or len(tensors) != 2 or shape(tensors[1])[-1] != 1:
        raise NotFusable("a cat onto the scores other than one sink column after the keys")
    column = tensors[1]
    sink = column.args[0] if is_op(column, aten.expand) else column
    if not (dtype(sink) and dtype(sink).is_floating_point) or len(shape(sink)) > rank or \
            tuple(shape(sink)[-2:]) != (1, 1):
        raise NotFusable(f"the column concatenated to the scores ({column.name}) varies along the queries: not a sink")
    return tensors[0], sink


def _negated(t: fx.Node, before: fx.Node) -> fx.Node:
    """``-t`` as a node (with its ``val``) before ``before``; dead code if the site is not fused."""
    return insert_with_val(before, aten.neg.default, (t,))


def _fill_value(arg: Any, scores_dtype: torch.dtype) -> float:
    """The constant masked scores become, as stored in the scores' dtype (a float32 finfo.min
    written into bfloat16 scores is -inf)."""
    value = python_scalar(arg)
    while value is None and is_op(arg, aten.lift_fresh_copy, aten.clone, aten.detach, aten.detach_, *CASTS) and shape(arg) == ():
        arg = arg.args[0]  # torch.tensor(-1e4) arrives as a copied constant
    if value is None and isinstance(arg, fx.Node) and is_op(arg, aten.scalar_tensor, aten.full) and shape(arg) == ():
        value = python_scalar(arg.args[0] if is_op(arg, aten.scalar_tensor) else arg.args[1])
    if value is None and is_op(arg, aten.full_like) and dtype(arg) == scores_dtype:
        value = python_scalar(arg.args[1])  # torch.full_like(s, -inf): the scores' shape, one value
    if value is None and isinstance(arg, fx.Node) and arg.op == "get_attr":
        constant = getattr(arg.graph.owning_module, arg.target, None)
        if isinstance(constant, torch.Tensor) and constant.dim() == 0 and constant.is_floating_point():
            value = float(constant)
    if value is None:
        raise NotFusable("masked scores are filled with a tensor, not a constant")
    return round_to(value, scores_dtype)


def _softcap(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """``tanh(s / c) * c`` (or ``tanh(s * (1/c)) * c``) → ``(s, c)``."""
    outer = scalar_factor(node)
    if outer is None or not is_op(outer[0], aten.tanh) or outer[1][1] != 1:
        return None
    inner = scalar_factor(outer[0].args[0])
    cap = python_scalar(outer[1][0])
    if inner is None or cap is None or len(outer[0].users) != 1:
        return None
    inner_c = python_scalar(inner[1][0])
    if inner_c is None or not math.isclose(inner_c ** -inner[1][1], cap, rel_tol=1e-6):
        return None
    return inner[0], abs(cap)  # tanh is odd: tanh(s / -c) * -c == tanh(s / c) * c
