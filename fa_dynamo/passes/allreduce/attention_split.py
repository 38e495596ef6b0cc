"""The attention feeding a row-parallel matmul (the paper's form): cut along its query rows too.

``attention → [0] → transpose(1, 2) → reshape [B, Sq, H·Dv] → linear`` is the attention's
o_proj. When the tiling-AllReduce cuts that matmul's token rows into chunks, each chunk can be
computed from its own query rows of the attention (``attention_rows``), so the attention is
split with the matmul and the first all_reduce starts after one chunk of attention, not all of
it. ``match_attention`` recognizes the chain (or says, with ``NotSplit``, why not);
``query_row_arguments`` cuts the op's per-row operands and shifts its band.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo import kernels as _kernels  # noqa: F401  (registers fa_dynamo::attention)
from fa_dynamo.passes.matching import aten, is_op, known_equal_sizes, normalize_dim, op_arguments, val

_ATTENTION = torch.ops.fa_dynamo.attention
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten)
_CASTS = (aten.to, aten._to_copy)
# Ops between the attention's [B, H, Sq, Dv] output and the o_proj's [B, Sq, H·Dv] input.
_LAYOUT_OPS = (*_RESHAPES, *_CASTS, aten.transpose, aten.permute, aten.clone, aten.contiguous)

Size = Union[int, torch.SymInt]


class NotSplit(Exception):
    """Raised with the reason the attention feeding a tiled matmul is left whole."""


@dataclass
class AttentionChain:
    """``fa_dynamo::attention → [0] → transpose(1, 2) → reshape [B, Sq, H·Dv]`` (casts and
    ``contiguous`` anywhere) as the input of a ``linear``/``matmul``: cutting the matmul's rows
    along Sq cuts the attention's query rows."""

    attention: fx.Node
    nodes: list[fx.Node]  # getitem(attention, 0) ... the matmul input, in graph order
    seq: Size  # Sq
    unread: list[fx.Node]  # getitem(attention, 1) with no users, if the graph kept one


# The attention op's operands indexed by query row, each with the dim that indexes it, and the
# band offsets, which are relative to the query index. Every other operand must be listed as
# independent of the query rows: an operand in neither table (the op's signature grew) leaves the
# attention whole, so add a new per-query-row operand to ``_QUERY_ROW_DIM`` (or, if it is read
# the same by every query row, to ``_QUERY_INDEPENDENT``).
_QUERY_ROW_DIM = {"q": 2, "bias": 2, "mask": 2, "q_segments": 1}
_QUERY_OFFSETS = ("min_offset", "max_offset")
_QUERY_INDEPENDENT = frozenset({"k", "v", "scale", "softcap", "fill", "kernel", "block_q", "block_k", "k_segments",
                                "zero_empty_rows", "fill_added"})  # a row rule: the same on any slice of the rows
# Read relative to the call's first query row (ALiBi's slope · (j − i)): a row slice would shift it.
_QUERY_RELATIVE = frozenset({"alibi_slopes"})


def match_attention(mm: fx.Node) -> Optional[AttentionChain]:
    """The attention whose output the matmul multiplies, through a token-major relayout; None when
    the matmul input does not come from ``fa_dynamo::attention``; NotSplit when it does, unclearly."""
    nodes: list[fx.Node] = []
    node = mm.args[1] if is_op(mm, aten.addmm) else mm.args[0]
    while is_op(node, *_LAYOUT_OPS):
        nodes.insert(0, node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and is_op(node.args[0], _ATTENTION)):
        return None
    attention = node.args[0]
    nodes.insert(0, node)
    outputs = list(attention.users)
    if node.args[1] != 0 or any(u is not node and (u.target is not operator.getitem or u.users) for u in outputs):
        raise NotSplit("the attention's log-sum-exp is read")
    if not is_op(mm, aten.linear, aten.matmul) or val(nodes[-1]).dim() != 3:
        raise NotSplit(f"{mm.target} multiplies tokens flattened over batch and sequence, not [B, Sq, features]")
    for n in nodes:
        if len(n.users) != 1:
            raise NotSplit(f"{n.name} on the way from the attention to the matmul is also read elsewhere")
    relative = [name for name in _QUERY_RELATIVE if op_arguments(attention).get(name) is not None]
    if relative:
        raise NotSplit(f"the attention's {relative} count query rows from the call's first; a row slice would shift them")
    known = (*_QUERY_ROW_DIM, *_QUERY_OFFSETS, *_QUERY_INDEPENDENT, *_QUERY_RELATIVE)
    unknown = [a.name for a in attention.target._schema.arguments if a.name not in known]
    if unknown:
        raise NotSplit(f"the attention op's operands {unknown} are not known to be per query row or not")
    out = val(node)  # [B, H, Sq, Dv]
    transposes = [n for n in nodes if is_op(n, aten.transpose, aten.permute)]
    reshapes = [n for n in nodes if is_op(n, *_RESHAPES) and not known_equal_sizes(val(n.args[0]).shape, val(n).shape)]
    if len(transposes) != 1 or len(reshapes) != 1 or nodes.index(transposes[0]) > nodes.index(reshapes[0]):
        raise NotSplit("the attention output reaches the matmul other than by one transpose, then one reshape")
    if not _swaps_heads_and_rows(transposes[0]):
        raise NotSplit(f"{transposes[0].name} does not move the query rows next to the batch dim")
    merged_in, merged_out = val(reshapes[0].args[0]), val(reshapes[0])
    if merged_in.dim() != 4 or merged_out.dim() != 3 or not known_equal_sizes(merged_in.shape[:2], merged_out.shape[:2]):
        raise NotSplit(f"{reshapes[0].name} does not merge heads into features of [B, Sq, H·Dv]")
    if not known_equal_sizes((out.shape[0], out.shape[2]), merged_out.shape[:2]):
        raise NotSplit("the matmul input's rows are not the attention's [B, Sq]")
    return AttentionChain(attention, nodes, out.shape[2], [u for u in outputs if u is not node])


def _swaps_heads_and_rows(node: fx.Node) -> bool:
    """``transpose(1, 2)`` or ``permute(0, 2, 1, 3)`` of a 4-D tensor."""
    if val(node.args[0]).dim() != 4:
        return False
    if is_op(node, aten.transpose):
        return sorted(normalize_dim(d, 4) for d in node.args[1:3]) == [1, 2]
    return [normalize_dim(d, 4) for d in node.args[1]] == [0, 2, 1, 3]


def attention_rows(graph: fx.Graph, chain: AttentionChain, start: Size, end: Size) -> fx.Node:
    """The matmul input for query rows ``[start, end)``: the attention of those rows, relaid out as before."""
    node = graph.call_function(chain.attention.target, (), query_row_arguments(graph, chain.attention, start, end))
    rows = arith(graph, operator.sub, end, start)
    row_dim = 2  # where the query rows are: [B, H, Sq, Dv] until the transpose, [B, Sq, ...] after it
    for old in chain.nodes:
        if old is chain.nodes[0]:
            node = graph.call_function(operator.getitem, (node, 0))
        elif is_op(old, aten.view, aten.reshape, aten._unsafe_view):  # the chunk's row count replaces Sq
            sizes = list(old.args[1])
            sizes[row_dim] = rows
            node = graph.call_function(old.target, (node, sizes, *old.args[2:]), dict(old.kwargs))
        else:
            node = graph.call_function(old.target, (node, *old.args[1:]), dict(old.kwargs))
            row_dim = 1 if is_op(old, aten.transpose, aten.permute) else row_dim
    return node


def query_row_arguments(graph: fx.Graph, attention: fx.Node, start: Size, end: Size) -> dict:
    """``attention``'s arguments by name, with its per-query-row operands cut to ``[start, end)``.

    A row slice of a band ``lo <= j - i <= hi`` (``i`` the query row) is the band shifted by
    ``start``: local row ``i' = i - start`` sees key ``j`` iff ``lo + start <= j - i' <= hi + start``
    (keys are not cut, so Sq != Sk needs nothing more). Operands that broadcast over the query rows
    (a dim of size 1) stay as they are.
    """
    kwargs = op_arguments(attention)
    for name, value in kwargs.items():
        if value is None or name in _QUERY_INDEPENDENT:
            continue
        if name in _QUERY_OFFSETS:
            kwargs[name] = arith(graph, operator.add, value, start)
        elif isinstance(value, fx.Node) and val(value).shape[_QUERY_ROW_DIM[name]] != 1:
            kwargs[name] = graph.call_function(aten.slice.Tensor, (value, _QUERY_ROW_DIM[name], start, end))
    return kwargs


def arith(graph: fx.Graph, fn, a: Any, b: Any) -> Any:
    """``a + b`` or ``a - b`` of sizes that are ints or SymInt nodes: an int when both are ints, else a node."""
    if isinstance(a, int) and isinstance(b, int):
        return fn(a, b)
    if isinstance(b, int) and b == 0:
        return a
    return graph.call_function(fn, (a, b))
