"""Segment masks in the graph: ``id_q[b, i] == id_k[b, j]`` read as two O(S) id vectors.

Packed sequences (transformers' ``packed_sequence_mask_function``: ``seq[b, q] == seq[b, kv]``)
and chunked attention (Llama 4's ``(q - pad[b]) // chunk == (kv - pad[b]) // chunk``) are an
equality whose one side depends only on the query index (and the batch) and the other only on
the key index. Broadcasting says so exactly: a side of shape ``[B or 1, 1, Sq or 1, 1]`` cannot
vary with the key or the head. ``lift_segments`` recognizes such an equality among the boolean
mask terms the band lifter left dense; ``SegmentIds.emit`` builds the op's ``q_segments [B, Sq]``
and ``k_segments [B, Sk]`` from the two sides — views of tensors the graph already computes.

Packed sequences also remap the causal comparison onto position ids
(``pos[b, kv] <= pos[b, q]``, a data comparison). ``resolve_packed_positions`` proves when that
comparison equals the index comparison ``kv <= q``: when it is ANDed with the equality of the
sequence ids transformers derives from the same positions (``cumsum(diff(pos) != 1)``), two keys
of one sequence have consecutive positions, so ``pos[j] - pos[i] = j - i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from fa_dynamo.passes.matching import aten, dtype, is_op, normalize_dim, shape

_COMPARISONS = (aten.le, aten.lt, aten.ge, aten.gt, aten.eq, aten.ne)


def _integer(node: fx.Node) -> bool:
    dt = dtype(node)
    return dt is not None and not dt.is_floating_point and not dt.is_complex


def strip_bool_casts(node: Any) -> Any:
    """``x.to(torch.bool)`` of a bool ``x`` is ``x``."""
    while is_op(node, aten.to, aten._to_copy) and dtype(node) == torch.bool and dtype(node.args[0]) == torch.bool:
        node = node.args[0]
    return node


def _unexpanded(node: Any) -> Any:
    while is_op(node, aten.expand):
        node = node.args[0]
    return node


def _varies_only_along(node: fx.Node, axis: int, scores_shape: tuple) -> bool:
    """``node`` broadcasts to the scores and is constant along every axis but ``axis`` and the
    batch axis (dim -4 of ``[B, H, Sq, Sk]`` scores)."""
    s = shape(node)
    if s is None or len(s) > len(scores_shape):
        return False
    for pos in range(-len(s), 0):
        if s[pos] == 1:
            continue
        if s[pos] != scores_shape[pos] or not (pos == axis or (pos == -4 and len(scores_shape) == 4)):
            return False
    return True


@dataclass(frozen=True)
class SegmentIds:
    """Key ``j`` is visible to query ``i`` iff ``q_side[.., i, 0] == k_side[.., 0, j]``."""

    q_side: fx.Node  # broadcastable to the scores, size 1 along the key axis and the head axis
    k_side: fx.Node  # size 1 along the query axis and the head axis

    def emit(self, graph: fx.Graph, batch: Any, num_q: Any, num_k: Any) -> tuple[fx.Node, fx.Node]:
        """``(q_segments [batch, num_q], k_segments [batch, num_k])``: views of the two sides
        (a cast where their dtypes differ or are bool)."""
        common = torch.promote_types(dtype(self.q_side), dtype(self.k_side))
        if common == torch.bool:
            common = torch.int32
        return (_emit_side(graph, self.q_side, 3, batch, num_q, common),
                _emit_side(graph, self.k_side, 2, batch, num_k, common))


def _emit_side(graph: fx.Graph, side: fx.Node, constant_dim: int, batch, length, common: torch.dtype) -> fx.Node:
    """``side`` (``[.., S, 1]`` or ``[.., 1, S]``) as ``[batch, length]``."""
    node = side
    for _ in range(4 - len(shape(side))):
        node = graph.call_function(aten.unsqueeze.default, (node, 0))
    node = graph.call_function(aten.select.int, (node, constant_dim, 0))  # [b, 1, S]
    node = graph.call_function(aten.select.int, (node, 1, 0))  # [b, S]
    node = graph.call_function(aten.expand.default, (node, [batch, length]))
    if dtype(side) != common:
        node = graph.call_function(aten.to.dtype, (node, common))
    return node


def lift_segments(
    mask_node: fx.Node, visible_where_true: bool, scores_shape: tuple, mutated: frozenset = frozenset()
) -> Optional[SegmentIds]:
    """The segment ids of a boolean mask term, or None if it is not ``id_q == id_k``.

    ``visible_where_true``: the key is visible where ``mask_node`` is True (else where False),
    so ``a == b`` with True-visible and ``a != b`` with True-hidden are both segments.
    """
    node, visible = strip_bool_casts(mask_node), visible_where_true
    while is_op(node, aten.bitwise_not, aten.logical_not):
        node, visible = strip_bool_casts(node.args[0]), not visible
    if not is_op(node, aten.eq, aten.ne) or is_op(node, aten.eq) != visible or len(scores_shape) < 2:
        return None
    sides = [_unexpanded(a) for a in node.args[:2]]
    if not all(isinstance(a, fx.Node) and _integer(a) and a not in mutated for a in sides) or node in mutated:
        return None
    for q_side, k_side in (sides, sides[::-1]):
        if _varies_only_along(q_side, -2, scores_shape) and _varies_only_along(k_side, -1, scores_shape):
            return SegmentIds(q_side, k_side)
    return None


# --- packed sequences: positions compared within one sequence --------------------------------


@dataclass(frozen=True)
class _Gather:
    """``base[batch_index, column]`` of a 2-D ``base``."""

    base: fx.Node
    batch_index: fx.Node
    column: fx.Node


def _gather(node: Any) -> Optional[_Gather]:
    if not is_op(node, aten.index) or len(node.args) < 2:
        return None
    base, indices = node.args[0], node.args[1]
    if len(shape(base) or ()) != 2 or len(indices) != 2 or not all(isinstance(i, fx.Node) for i in indices):
        return None
    return _Gather(base, indices[0], indices[1])


def _packed_ids_of(node: fx.Node) -> Optional[fx.Node]:
    """The positions ``P`` if ``node`` is ``cumsum(diff(P, prepend=<one column>) != 1, -1)``."""
    if not is_op(node, aten.cumsum) or normalize_dim(node.args[1], 2) != 1:
        return None
    ne = node.args[0]
    if not is_op(ne, aten.ne) or ne.args[1] != 1:
        return None
    diff = ne.args[0]
    if not is_op(diff, aten.diff):
        return None
    args = list(diff.args) + [None] * (5 - len(diff.args))
    positions, n, dim, prepend, append = args[:5]
    n = diff.kwargs.get("n", 1 if n is None else n)
    dim = diff.kwargs.get("dim", -1 if dim is None else dim)
    prepend = diff.kwargs.get("prepend", prepend)
    append = diff.kwargs.get("append", append)
    if n != 1 or normalize_dim(dim, 2) != 1 or append is not None or not isinstance(prepend, fx.Node):
        return None
    if len(shape(positions) or ()) != 2 or (shape(prepend) or (0, 0))[-1] != 1 or not _integer(positions):
        return None
    return positions


def resolve_packed_positions(dense: tuple) -> tuple[list, tuple]:
    """``([(comparison, column a, column b, shift a, shift b)], remaining dense terms)``.

    ``P[b, a] + sa OP P[b, c] + sc`` (integer shifts) is listed (and dropped from ``dense``) when ``dense`` also holds
    ``ids[b, a] == ids[b, c]`` with ``ids = cumsum(diff(P) != 1)`` — transformers' packed
    sequence ids — on the same batch index and column index nodes: inside one sequence
    positions step by exactly 1, so the comparison equals ``a + sa OP c + sc`` on the indices.
    """
    same_sequence = [s for s in (_sequence_equality(d) for d in dense) if s is not None]
    resolved, remaining = [], []
    for d in dense:
        found = _position_comparison(d, same_sequence)
        if found is None:
            remaining.append(d)
        else:
            resolved.append(found)
    return resolved, tuple(remaining)


def _sequence_equality(term: fx.Node) -> Optional[tuple]:
    node = strip_bool_casts(term)
    if not is_op(node, aten.eq):
        return None
    a, b = (_gather(x) for x in node.args[:2])
    if a is None or b is None or a.base is not b.base or a.batch_index is not b.batch_index:
        return None
    positions = _packed_ids_of(a.base)
    if positions is None:
        return None
    return _unexpanded(positions), shape(a.base), a.batch_index, (a.column, b.column)


def _shifted(node: Any) -> tuple[Any, int]:
    """``x + c`` / ``x - c`` with an integer ``c`` → ``(x, ±c)``; anything else → ``(node, 0)``
    (transformers' sliding window compares ``pos[kv] > pos[q] - window``)."""
    if is_op(node, aten.add, aten.sub) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 \
            and isinstance(node.args[1], int) and not isinstance(node.args[1], bool):
        return node.args[0], node.args[1] if is_op(node, aten.add) else -node.args[1]
    return node, 0


def _position_comparison(term: fx.Node, same_sequence: list) -> Optional[tuple]:
    """``P[b, a] + sa OP P[b, c] + sc`` → ``(comparison, column a, column c, sa, sc)`` where
    ``same_sequence`` holds the sequence equality of columns a and c."""
    node = strip_bool_casts(term)
    if not is_op(node, *_COMPARISONS):
        return None
    (x, shift_a), (y, shift_b) = (_shifted(arg) for arg in node.args[:2])
    a, b = _gather(x), _gather(y)
    if a is None or b is None or a.batch_index is not b.batch_index:
        return None
    root = _unexpanded(a.base)
    if root is not _unexpanded(b.base) or shape(a.base) != shape(b.base):
        return None
    for seq_root, base_shape, batch_index, columns in same_sequence:
        if (seq_root is root and base_shape == shape(a.base) and batch_index is a.batch_index
                and columns in ((a.column, b.column), (b.column, a.column))):
            return node, a.column, b.column, shift_a, shift_b
    return None
