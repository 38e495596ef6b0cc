"""Rewriting a matched attention site into one ``fa_dynamo::attention`` call.

Operands are put in the op's ``[B, H, S, D]`` layout (permutes, transposes and batch reshapes
are views; ``repeat_kv`` is undone so GQA reaches the op without copies), masks and biases are
brought to 4-D (a mask term comparing per-query with per-key ids — packed sequences, chunked
attention — becomes the op's ``q_segments``/``k_segments`` instead), and the op's output is put
back in the layout P·V had.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.attention.site import NotFusable, Operand, Scalar, Site
from fa_dynamo.passes.attention.mask_segments import SegmentIds, lift_segments
from fa_dynamo.passes.matching import aten, dtype, is_op, known_equal, python_scalar, shape, undo_repeat_kv


def _canonical_batch(site: Site) -> tuple:
    """The op's (B, H) layout: the scores' batch dims where masks apply, else Q·Kᵀ's."""
    ref = site.batch_view if site.batch_view is not None else site.qk
    return tuple(shape(ref)[:-2])


def _output_layout(site: Site) -> Optional[Union[str, tuple]]:
    """How the op's ``[B, H, Sq, Dv]`` output becomes P·V's: None (as is), ``"flatten"``
    (``[B*H, ...]``) or P·V's shape to reshape to (symbolic sizes included)."""
    batch = _canonical_batch(site)
    probs = site.pv.args[1][0] if is_op(site.pv, aten.einsum) else site.pv.args[0]
    have = tuple(shape(probs)[:-2])
    if have == batch:
        return None
    if site.out_permute is None:
        if len(have) == 1 and len(batch) == 2:
            return "flatten"
        if known_equal(math.prod(have), math.prod(batch)):
            return shape(site.pv)
    raise NotFusable(f"the probabilities have batch dims {have}, the masked scores {batch}")


def _sizes_from(graph: fx.Graph, sizes: tuple, alive: list) -> list:
    """``sizes`` as graph values: ints as they are, a symbolic size as ``sym_size`` of a node that
    feeds the op (found behind ``alive``), so the dead site stays dead."""
    values = []
    for size in sizes:
        if isinstance(size, int):
            values.append(size)
            continue
        seen, todo, found = set(), list(alive), None
        while todo and found is None:
            node = todo.pop(0)
            if node in seen:
                continue
            seen.add(node)
            dims = shape(node) or ()
            found = next((graph.call_function(aten.sym_size.int, (node, i))
                          for i, d in enumerate(dims) if isinstance(d, torch.SymInt) and known_equal(d, size)), None)
            todo += node.all_input_nodes
        if found is None:
            raise NotFusable(f"no live graph value holds the symbolic size {size}")
        values.append(found)
    return values


_NEW_TENSOR = (aten.new_ones, aten.new_zeros, aten.new_empty, aten.new_full)
# x.full_like(v) and kin read x's sizes too: rerouted as the new_* op of the same name at x's sizes
_LIKE = {aten.full_like: aten.new_full.default, aten.zeros_like: aten.new_zeros.default,
         aten.ones_like: aten.new_ones.default, aten.empty_like: aten.new_empty.default}


def is_metadata_read(node: fx.Node) -> bool:
    """``x.size(i)``, ``x.new_ones(...)``, ``torch.full_like(x, v)`` and kin: read ``x``'s sizes,
    dtype or device only."""
    return is_op(node, aten.sym_size.int, *_NEW_TENSOR, *_LIKE)


def _reroute_metadata_reads(graph: fx.Graph, site: Site) -> None:
    """Point size/dtype/device reads of the scores and probabilities at values that outlive the
    site: a size as an int or as ``sym_size`` of q or k (or what they are read from), a
    ``new_*`` at q with the dtype made explicit. Equivalent whether or not the site fuses."""
    batch = _canonical_batch(site)
    k_source = _undo_repeat_kv(site.k, batch, site.mutated) or site.k.node
    for read in site.metadata_reads:
        with graph.inserting_before(read):
            if is_op(read, aten.sym_size.int):
                size, = _sizes_from(graph, (shape(read.args[0])[read.args[1]],), [site.q.node, k_source])
                for user in list(read.users):
                    user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs),
                                                             lambda n: size if n is read else n)
            elif is_op(read, *_LIKE):
                sizes = _sizes_from(graph, shape(read.args[0]), [site.q.node, k_source])
                read.target = _LIKE[read.target.overloadpacket]
                read.kwargs = {"dtype": read.kwargs.get("dtype") or dtype(read.args[0])}
                read.args = (site.q.node, sizes, *read.args[1:])
            else:
                read.kwargs = {**read.kwargs, "dtype": read.kwargs.get("dtype") or dtype(read.args[0])}
                read.args = (site.q.node, *read.args[1:])


def _batch_sizes(graph: fx.Graph, site: Site) -> list:
    """The canonical batch sizes as graph values (ints, or SymInt nodes that outlive the site)."""
    batch = _canonical_batch(site)
    if all(isinstance(d, int) for d in batch):
        return list(batch)
    if site.batch_view is not None and is_op(site.batch_view, aten.view, aten.reshape, aten._unsafe_view):
        sizes = list(site.batch_view.args[1])[: len(batch)]
        if all(isinstance(s, (int, fx.Node)) for s in sizes) and -1 not in sizes:
            return sizes
    return _sizes_from(graph, batch, [site.q.node])


def _kv_heads(op: Operand, site: Site) -> Any:
    """Key/value heads the op would receive for ``op`` if grouping is allowed."""
    batch = _canonical_batch(site)
    undone = _undo_repeat_kv(op, batch, site.mutated)
    if undone is not None:
        return shape(undone)[1]
    node_batch = _operand_batch(op)
    if len(node_batch) == len(batch) == 2 and node_batch[0] == batch[0] and node_batch[1] == 1:
        return 1
    return batch[-1] if batch else 1


def _emit_operand(graph: fx.Graph, op: Operand, site: Site, sizes: list, role: str, grouped: bool = True) -> fx.Node:
    """The operand in the op's ``[B, H, S, D]`` layout. With ``grouped``, K/V keep fewer heads
    (GQA undone, MQA broadcast kept); K and V must then agree, which the caller checks."""
    node = op.node
    if op.permute is not None:
        node = graph.call_function(aten.permute.default, (node, op.permute))
    if op.transpose_last:
        node = graph.call_function(aten.transpose.int, (node, -2, -1))
    batch = _canonical_batch(site)
    node_batch = _operand_batch(op)
    if role != "q":
        undone = _undo_repeat_kv(op, batch, site.mutated) if grouped else None
        if undone is not None:
            return undone
        if len(node_batch) == len(batch) == 2 and node_batch[0] == batch[0] and node_batch[1] == 1:
            if not grouped:  # one head broadcast by matmul: expand it (a view) to every head
                node = graph.call_function(aten.expand.default, (node, list(sizes) + [-1, -1]))
        elif tuple(node_batch) != batch:
            node = _reshape_batch(graph, node, node_batch, batch, sizes, role)
    elif tuple(node_batch) != batch:
        node = _reshape_batch(graph, node, node_batch, batch, sizes, role)
    for _ in range(2 - len(batch)):
        node = graph.call_function(aten.unsqueeze.default, (node, 0))
    return node


def _operand_batch(op: Operand) -> tuple:
    s = shape(op.node)
    if op.permute is not None:
        s = tuple(s[i] for i in op.permute)
    return tuple(s[:-2])


def _reshape_batch(graph, node, have: tuple, want: tuple, sizes: list, role: str) -> fx.Node:
    if math.prod(have) != math.prod(want):
        raise NotFusable(f"{role} has batch dims {have}, the scores {want}")
    last = [-1, graph.call_function(aten.sym_size.int, (node, -1))]
    return graph.call_function(aten.reshape.default, (node, list(sizes) + last))


def _undo_repeat_kv(op: Operand, batch: tuple, mutated: frozenset) -> Optional[fx.Node]:
    """The K/V a repeated operand was made from (``matching.undo_repeat_kv``), for a plain
    ``[B, H, S, D]`` operand (no permute or transpose in between)."""
    if op.permute is not None or op.transpose_last or len(batch) != 2:
        return None
    return undo_repeat_kv(op.node, mutated)


def _emit_scale(graph: fx.Graph, site: Site) -> Scalar:
    if not site.scale:
        return 1.0
    if all(python_scalar(f) is not None for f, _ in site.scale):
        return math.prod(python_scalar(f) ** p for f, p in site.scale)
    result: Scalar = 1.0
    for f, p in site.scale:
        result = graph.call_function(operator.mul if p == 1 else operator.truediv, (result, f))
    return result


def rewrite(graph: fx.Graph, site: Site, config: FastAttentionConfig) -> None:
    pv = site.pv
    out_layout = _output_layout(site)
    batch = _canonical_batch(site)
    # The dtypes eager's matmuls run in: the operands' own, or autocast's (which casts q, k, v
    # to its dtype inside the matmuls, so the nodes before them do not show it).
    op_dtype = torch.promote_types(dtype(site.qk), dtype(site.pv))
    _reroute_metadata_reads(graph, site)
    anchor = pv.prev
    with graph.inserting_before(pv):
        sizes = _batch_sizes(graph, site)
        grouped = _kv_heads(site.k, site) == _kv_heads(site.v, site)
        q, k, v = (_emit_operand(graph, op, site, sizes, role, grouped)
                   for op, role in ((site.q, "q"), (site.k, "k"), (site.v, "v")))
        q, k, v = (t if dtype(op.node) == op_dtype else graph.call_function(aten.to.dtype, (t, op_dtype))
                   for t, op in ((q, site.q), (k, site.k), (v, site.v)))
        for factor, power in site.scale_tensors:  # (q·kᵀ)·t = (q·t)·kᵀ, t a one-element tensor (0-d: no promotion)
            t = graph.call_function(aten.reshape.default, (factor, []))
            q = graph.call_function(aten.mul.Tensor if power == 1 else aten.div.Tensor, (q, t))
        bias = _combine(graph, [_relayout(graph, b, sizes) if b in site.relayout else _to_4d(graph, b)
                                for b in site.biases], aten.add.Tensor)
        segments, masks = _segment_masks(site)
        hidden = [
            _to_4d(graph, m) if where_true else graph.call_function(aten.bitwise_not.default, (_to_4d(graph, m),))
            for m, where_true in masks
        ]
        mask = _combine(graph, hidden, aten.bitwise_or.Tensor)
        fill = float("-inf") if site.fill is None else site.fill
        lo = None if site.band_lo is None else site.band_lo.emit(graph)
        hi = None if site.band_hi is None else site.band_hi.emit(graph)
        op = graph.call_function(torch.ops.fa_dynamo.attention.default, (q, k, v), {
            "bias": bias, "mask": mask, "scale": _emit_scale(graph, site), "softcap": site.softcap, "fill": fill,
            "min_offset": lo, "max_offset": hi, "kernel": config.kernel, "block_q": config.block_q,
            "block_k": config.block_k, **_emit_segments(graph, site, segments, sizes, q, k),
            **_emit_alibi(graph, site, sizes, q, op_dtype), "zero_empty_rows": site.zero_empty_rows,
            "fill_added": bool(site.fill_added),
        })
        out = graph.call_function(operator.getitem, (op, 0))
        if site.sink is not None:
            out = _with_sink(graph, op, out, site.sink, op_dtype)
        for _ in range(2 - len(batch)):
            out = graph.call_function(aten.squeeze.dim, (out, 0))
        if out_layout == "flatten":
            out = graph.call_function(aten.flatten.using_ints, (out, 0, 1))
        elif out_layout is not None:
            out = graph.call_function(aten.reshape.default, (out, _sizes_from(graph, out_layout, [q, k, v])))
        if site.out_permute is not None:
            out = graph.call_function(aten.permute.default, (out, site.out_permute))
        if dtype(pv) != op_dtype:
            out = graph.call_function(aten.to.dtype, (out, dtype(pv)))
    _type_check(anchor, pv, out)
    pv.replace_all_uses_with(out)


def _with_sink(graph: fx.Graph, op: fx.Node, out: fx.Node, sink: fx.Node, out_dtype: torch.dtype) -> fx.Node:
    """The op's ``[B, H, Sq, Dv]`` output as eager gives it with a sink logit appended as one
    more key and its probability dropped (gpt-oss): the sink only adds ``exp(sink)`` to each
    row's normalizer, so every probability shrinks by ``Z / (Z + exp(sink)) = sigmoid(lse - sink)``,
    computed in float32 like the log-sum-exp. A row with no visible key (lse = -inf, NaN from
    the op) gives 0: the sink takes all the probability."""
    call = graph.call_function
    lse = call(aten.unsqueeze.default, (call(operator.getitem, (op, 1)), -1))  # [B, H, Sq, 1] float32
    sink = call(aten.to.dtype, (_to_4d(graph, sink), torch.float32))
    shrink = call(aten.sigmoid.default, (call(aten.sub.Tensor, (lse, sink)),))
    scaled = call(aten.mul.Tensor, (out, shrink))
    scaled = call(aten.where.ScalarSelf, (call(aten.isneginf.default, (lse,)), 0.0, scaled))
    return call(aten.to.dtype, (scaled, out_dtype))


def _type_check(anchor: fx.Node, pv: fx.Node, out: fx.Node) -> None:
    """Run the inserted nodes on fake tensors: the op's own input checks reject a wrong
    layout here, at compile time, and the output must match what P·V produced. Every new
    node gets its ``val``, so later sites can read shapes off a rewritten one."""
    mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in pv.all_input_nodes])
    node = anchor.next
    try:
        with mode or contextlib.nullcontext():
            while node is not pv:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
                node.meta["val"] = node.target(*args, **kwargs)
                node = node.next
    except Exception as e:  # the rewrite is wrong for this site: leave it alone
        raise NotFusable(f"the rewrite does not type-check ({type(e).__name__}: {e})") from e
    got, want = out.meta["val"], pv.meta["val"]
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise NotFusable(f"the rewrite gives {tuple(got.shape)} {got.dtype}, P·V gave {tuple(want.shape)} {want.dtype}")


def _segment_masks(site: Site) -> tuple[list[SegmentIds], list]:
    """The mask terms that are segment equalities (``mask_segments``), and the other terms."""
    scores_shape = _canonical_batch(site) + tuple(shape(site.qk)[-2:])
    segments, others = [], []
    for m, where_true in site.masks:
        ids = lift_segments(m, not where_true, scores_shape, site.mutated)
        if ids is not None:
            segments.append(ids)
        else:
            others.append((m, where_true))
    return segments, others


def _emit_segments(graph: fx.Graph, site: Site, segments: list[SegmentIds], sizes: list, q, k) -> dict:
    """The op's ``q_segments [B, Sq]`` / ``k_segments [B, Sk]`` keyword arguments (none without).

    Two equalities at once (packed sequences chunked as Llama 4 does) are one equality of pairs:
    ``(a, c)`` becomes ``a · span + (c − low)`` with ``c − low`` in ``[0, span)`` over both sides,
    which is injective, and non-decreasing where ``a`` is and ``c`` is within each ``a``.
    """
    if not segments:
        return {}
    call = graph.call_function
    num_q, num_k = (d if isinstance(d, int) else call(aten.sym_size.int, (t, 2))
                    for d, t in zip(shape(site.qk)[-2:], (q, k)))
    batch = sizes[0] if len(sizes) == 2 else 1
    q_ids, k_ids = None, None
    for ids in segments:
        q_next, k_next = (call(aten.to.dtype, (t, torch.int64)) for t in ids.emit(graph, batch, num_q, num_k))
        if q_ids is None:
            q_ids, k_ids = q_next, k_next
            continue
        both = call(aten.cat.default, ([call(aten.flatten.using_ints, (q_next, 0, -1)),
                                        call(aten.flatten.using_ints, (k_next, 0, -1)),
                                        call(aten.new_zeros.default, (q_next, [1]))],))  # never empty
        low = call(aten.amin.default, (both,))
        span = call(aten.add.Tensor, (call(aten.sub.Tensor, (call(aten.amax.default, (both,)), low)), 1))
        q_ids, k_ids = (call(aten.add.Tensor, (call(aten.mul.Tensor, (ids_, span)), call(aten.sub.Tensor, (nxt, low))))
                        for ids_, nxt in ((q_ids, q_next), (k_ids, k_next)))
    return {"q_segments": q_ids, "k_segments": k_ids}


def _emit_alibi(graph: fx.Graph, site: Site, sizes: list, q: fx.Node, op_dtype: torch.dtype) -> dict:
    """The op's ``alibi_slopes`` keyword argument, ``[B or 1, H or 1]`` in the op's compute dtype
    (float32, float64 for float64 inputs; none without): each term's factor laid out as its bias's
    batch dims (checked in ``score_chain``), scaled."""
    call, slopes = graph.call_function, []
    compute = torch.float64 if op_dtype == torch.float64 else torch.float32
    for term in site.alibi:
        if term.factor is None:
            slope = call(aten.new_full.default, (q, [1, 1], term.scale), {"dtype": compute})
        else:
            lead = list(shape(term.bias)[:-2])
            if known_equal(math.prod(shape(term.factor)), 1):
                layout = [1, 1]
            elif term.bias in site.relayout:
                layout = list(sizes)
            else:
                layout = _sizes_from(graph, [1] * (2 - len(lead)) + lead, [term.factor, q])
            slope = call(aten.reshape.default, (term.factor, layout))
            slope = call(aten.mul.Tensor, (call(aten._to_copy.default, (slope,), {"dtype": compute}), term.scale))
        slopes.append(slope)
    return {"alibi_slopes": _combine(graph, slopes, aten.add.Tensor)} if slopes else {}


def _relayout(graph: fx.Graph, node: fx.Node, sizes: list) -> fx.Node:
    last = [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (node, i - 2))
            for i, d in enumerate(shape(node)[-2:])]
    return _to_4d(graph, graph.call_function(aten.reshape.default, (node, list(sizes) + last)), len(sizes) + 2)


def _to_4d(graph: fx.Graph, node: fx.Node, rank: Optional[int] = None) -> fx.Node:
    for _ in range(4 - (len(shape(node)) if rank is None else rank)):
        node = graph.call_function(aten.unsqueeze.default, (node, 0))
    return node


def _combine(graph: fx.Graph, nodes: list, op) -> Optional[fx.Node]:
    if not nodes:
        return None
    result = nodes[0]
    for n in nodes[1:]:
        result = graph.call_function(op, (result, n))
    return result
