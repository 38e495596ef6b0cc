"""The attention pass: ``softmax(Q·Kᵀ ⊕ ...) · V`` → ``fa_dynamo::attention``.

Structural matching, not a list of patterns. From every softmax over the last dim:

1. walk back through the *score chain* — casts, batch-only views, scalar scale (``mul``/``div``),
   tanh softcap, additive bias (``add``), masks (``masked_fill``/``where``) — to a matmul
   (``matmul``/``bmm``/``einsum``) of two operands;
2. walk forward through casts, eval-mode dropout and batch-only views to the matmul with V;
3. read q and k off the first matmul (undoing a transpose of k, peeling scalar scales, undoing
   ``repeat_kv`` / ``repeat_interleave`` so GQA reaches the op without copies) and v off the
   second;
4. lift every mask whose structure is recognized (``fa_dynamo.passes.mask_lifting``) into a band;
   pass the others on as dense tensors;
5. check that the chain folds into the op's fixed order (scale → softcap → bias → fill) exactly,
   and rewrite. The old nodes die, and with them any Sq×Sk mask built only for this site.

Inside ``torch.autocast`` regions the nodes first get eager's dtypes (``_apply_autocast``), so
the op receives q, k, v in the dtype eager's matmuls run in and returns eager's dtype.

A site with anything not exactly understood is left alone and reported with the reason.
"""

from __future__ import annotations

import logging
import contextlib
import math
import operator
from collections import Counter
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.attention_rewrite import is_metadata_read, rewrite
from fa_dynamo.passes.attention_site import NotFusable, Operand, Scalar, Site
from fa_dynamo.passes.score_chain import fold_events, settle_alibi
from fa_dynamo.passes.sdpa import expand_sdpa, is_sdpa
from fa_dynamo.passes.manual_softmax import _row_max_of, canonicalize_manual_softmax
from fa_dynamo.passes.matching import (
    aten, describe, dtype, insert_with_val, is_op, is_symbolic_scalar, mutated_nodes, normalize_dim, python_scalar,
    round_to, shape, val, writes_between,
)

log = logging.getLogger(__name__)

_MATMULS = (aten.matmul, aten.bmm, aten.einsum)
_CASTS = (aten.to, aten._to_copy, aten.type_as)
_IDENTITIES = (aten.clone, aten.contiguous, aten.alias)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)
# In-place forms count as their functional forms in the score chain: each chain node has one
# user, so nothing else sees the scores before or after the write.
_MUL, _DIV, _ADD = (aten.mul, aten.mul_), (aten.div, aten.div_), (aten.add, aten.add_)
_MASKED_FILL = (aten.masked_fill, aten.masked_fill_)


class AttentionReport(PassReport):
    def headline(self) -> str:
        kinds = Counter(s.mask for s in self.sites if s.fused)
        masks = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        return f"fused {len(self.fused)}/{len(self.sites)} attention sites" + (f" (mask: {masks})" if masks else "")


class AttentionPass(GraphPass):
    name = "attention"
    report_type = AttentionReport

    def enabled(self, config: FastAttentionConfig) -> bool:
        return config.attention

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        graph = gm.graph
        expanded = _expand_sdpa_calls(graph, report)
        kept = {n for e in expanded.values() for n in e.kept}  # SDPA calls that may yet be restored
        dead_code = lambda: _eliminate_dead_code(graph, kept)  # noqa: E731
        for where in canonicalize_manual_softmax(gm):
            log.debug("hand-written softmax at %s read as aten.softmax", where)
        _type_as_to_dtype(graph)
        mutated = frozenset(mutated_nodes(graph))
        stale = _apply_autocast(gm)
        for softmax in list(graph.nodes):
            if not is_op(softmax, *_SOFTMAXES) or softmax.graph is not graph:
                continue
            sdpa = expanded.get(softmax)
            where = describe(softmax if sdpa is None else sdpa.call)
            try:
                if not _is_candidate(softmax):
                    if sdpa is not None:
                        raise NotFusable("SDPA's written-out form is not attention-shaped")
                    log.debug("%s is not attention (no Q·Kᵀ behind it or no P·V after it)", describe(softmax))
                    continue
                site = _match(softmax, mutated)
                if (inside := {site.qk, softmax, site.pv} & stale.keys()):
                    why = stale[next(iter(inside))]
                    raise NotFusable(f"inside a torch.autocast region whose dtypes could not be recomputed ({why})")
                rewrite(graph, site, config)
            except NotFusable as e:
                if sdpa is not None:
                    sdpa.restore()
                report.sites.append(SiteReport(where, False, str(e)))
            else:
                report.sites.append(SiteReport(where, True, mask=_mask_kind(site), kernel=config.kernel))
                if sdpa is not None:
                    sdpa.erase()
            if sdpa is not None:
                kept.difference_update(sdpa.kept)
            dead_code()  # the fused site's old nodes, or what a refused rewrite had started


_SOFTMAXES = (aten.softmax, aten._softmax, aten._safe_softmax)


def _eliminate_dead_code(graph: fx.Graph, kept: set) -> None:
    """FX's dead-code elimination, keeping the SDPA calls still undecided (``kept``); random ops
    count as pure or not as FX decides by default (Inductor's ``fallback_random`` under compile)."""
    if not kept:
        graph.eliminate_dead_code()
        return
    impure_random = torch._inductor.config.fallback_random if torch._guards.TracingContext.try_get() else True
    graph.eliminate_dead_code(is_impure_node=lambda n: n in kept or n.is_impure(impure_random))


def _expand_sdpa_calls(graph: fx.Graph, report: PassReport) -> dict:
    """Every SDPA call written out as its math (``sdpa.expand_sdpa``), by the softmax it starts
    from; calls it cannot write out exactly are reported and left alone."""
    expanded = {}
    for node in list(graph.nodes):
        if not is_sdpa(node):
            continue
        expansion, why = expand_sdpa(node)
        if expansion is None:
            report.sites.append(SiteReport(describe(node), False, why))
        else:
            expanded[expansion.softmax] = expansion
    return expanded


def _type_as_to_dtype(graph: fx.Graph) -> None:
    """``x.type_as(y)`` with x, y on one device → ``x.to(y.dtype)``: it reads only y's dtype, and
    y may then be scores the site consumes (LongT5: ``softmax(s.float()).type_as(s)``)."""
    for node in list(graph.nodes):
        if not is_op(node, aten.type_as) or node.kwargs:
            continue
        x, y = (val(a) for a in node.args)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.device == y.device:
            node.target, node.args = aten.to.dtype, (node.args[0], y.dtype)


# Weight matmuls: what a softmax over their output computes is not attention (an MoE router).
_LINEAR = (aten.linear, aten.addmm, aten.mm)
# Ops attention probabilities pass on their way to P·V (the near-misses included).
_PROBS_CHAIN = (*_CASTS, *_IDENTITIES, *_VIEWS, *_MUL, *_DIV, *_MASKED_FILL, aten.where, aten.expand,
                aten.dropout, aten.slice, aten.narrow)


def _is_candidate(softmax: fx.Node) -> bool:
    """A softmax with a Q·Kᵀ-like matmul behind it (through any ops but a linear layer) and a
    matmul after it (through the ops a probability chain is made of). Others (MoE routers:
    ``softmax(linear(h))`` → ``topk``) are not attention and not reported as sites."""
    return (_reaches(softmax.args[0], lambda n: n.all_input_nodes, _is_qk_matmul,
                     lambda n: not is_op(n, *_LINEAR), depth=12)
            and _reaches(softmax, lambda n: list(n.users), _is_scores_matmul,
                         lambda n: n is softmax or is_op(n, *_PROBS_CHAIN), depth=8))


def _reaches(start: fx.Node, step, found, passes, depth: int) -> bool:
    """Breadth-first from ``start`` along ``step``: a node ``found`` within ``depth`` hops,
    going on only through call_function nodes that ``passes``."""
    frontier, seen = [start], {start}
    for _ in range(depth):
        next_frontier = []
        for node in frontier:
            if found(node):
                return True
            if node.op == "call_function" and passes(node):
                next_frontier += [n for n in step(node) if n not in seen]
                seen.update(next_frontier)
        frontier = next_frontier
    return False


def _is_autocast(node: fx.Node, name: str) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == name


def _apply_autocast(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Give every node from the first ``_enter_autocast`` on the dtype it has in eager.

    Pre-dispatch graphs are traced above autocast: the regions stay as enter/exit nodes and
    each ``val`` has the dtype the op would have without autocast (a float32 Q·Kᵀ where eager
    computes it in bfloat16). Re-running those nodes on fake tensors with the regions really
    entered applies autocast's own rules — every device type and autocast dtype, nested and
    ``enabled=False`` regions — so matching reads eager's dtypes, and the rewrite casts q, k, v
    to the dtype eager's matmuls ran in. Returns the nodes that could not be re-run (with
    why): their dtypes are unknown, so sites there are refused.
    """
    nodes = list(gm.graph.nodes)
    start = next((i for i, n in enumerate(nodes) if _is_autocast(n, "_enter_autocast")), None)
    if start is None:
        return {}
    mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in nodes])
    entered: list = []
    contexts: dict[fx.Node, Any] = {}  # _enter_autocast node → the autocast it entered
    read = lambda n: contexts[n] if n in contexts else n.meta.get("val")  # noqa: E731
    index = start
    try:
        with mode or contextlib.nullcontext():
            for index in range(start, len(nodes)):
                node = nodes[index]
                if node.op == "output":
                    break
                if not (isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem
                        or _is_autocast(node, "_enter_autocast") or _is_autocast(node, "_exit_autocast")):
                    continue  # not an op autocast changes (and grad-mode switches must not run here)
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), read)
                result = node.target(*args, **kwargs)
                if _is_autocast(node, "_enter_autocast"):
                    entered.append(result)
                    contexts[node] = result
                elif _is_autocast(node, "_exit_autocast"):
                    entered.remove(args[0])
                else:
                    node.meta["val"] = result
        return {}
    except Exception as e:  # noqa: BLE001  (any op fake tensors cannot run: its dtypes stay unknown)
        why = f"{type(e).__name__} at {nodes[index].name}: {e}"
        return {n: why for n in nodes[start:]}
    finally:
        for context in reversed(entered):
            torch.amp.autocast_mode._exit_autocast(context)


def _mask_kind(site: Site) -> str:
    """A short name for what the op received: causal / window / band / padding / dense / bias."""
    parts = []
    if site.band_lo is not None or site.band_hi is not None:
        parts.append("window" if site.band_lo is not None and site.band_hi is not None else
                     "causal" if site.band_hi is not None else "band")
    if site.masks:
        small = all(shape(m) is not None and (len(shape(m)) < 2 or shape(m)[-2] == 1) for m, _ in site.masks)
        parts.append("padding" if small else "dense")
    if site.alibi:
        parts.append("alibi")
    if site.biases:
        parts.append("bias")
    return "+".join(parts) or "none"


# --- matching ---------------------------------------------------------------------------------


def _match(softmax: fx.Node, mutated: frozenset) -> Site:
    x = softmax.args[0]
    rank = len(shape(x) or ())
    if rank < 2 or normalize_dim(softmax.args[1], rank) != rank - 1:
        raise NotFusable("softmax is not over the last dim")
    reads: list[fx.Node] = []  # users of the scores or probabilities that read only metadata
    events, qk, sink = _walk_scores(x, reads)
    if is_op(qk, aten.baddbmm):  # beta * bias + alpha * (q @ kᵀ)
        beta, alpha = qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
        if beta not in (0, 1) or (python_scalar(alpha) is None and not is_symbolic_scalar(alpha)):
            raise NotFusable(f"baddbmm with beta={beta}, alpha={alpha}")
        bias = qk.args[0]
        zeros = is_op(bias, aten.zeros, aten.new_zeros, aten.zeros_like, aten.zero, aten.zero_) or (
            is_op(bias, aten.full) and bias.args[1] == 0)  # torch.empty(..).zero_() too
        events = [("scale", (alpha, 1))] + ([("bias", bias, qk)] if beta == 1 and not zeros else []) + events
    pv = _walk_probs(softmax, reads, with_sink=sink is not None)
    site = Site(softmax, qk, pv, mutated=mutated, metadata_reads=reads,
                zero_empty_rows=is_op(softmax, aten._safe_softmax))
    _read_qk(site)
    _read_pv(site)
    if {site.q.node, site.k.node} & writes_between(qk, pv):
        raise NotFusable("q or k is modified in place between Q·Kᵀ and P·V")
    fold_events(site, events)
    if sink is not None:
        _check_sink(site, *sink)
    settle_alibi(site)
    return site


def _is_scores_matmul(node: Any) -> bool:
    return is_op(node, *_MATMULS) and not (is_op(node, aten.einsum) and len(node.args[1]) != 2)


def _is_qk_matmul(node: Any) -> bool:
    """Q·Kᵀ may also be ``baddbmm(bias, q, kᵀ, beta=, alpha=)`` (BLOOM's ALiBi)."""
    return _is_scores_matmul(node) or is_op(node, aten.baddbmm)


def _leads_to_scores(node: Any, depth: int = 24) -> bool:
    """Whether walking back through score-chain ops reaches a matmul (picks the chain operand)."""
    while depth > 0 and isinstance(node, fx.Node):
        if _is_qk_matmul(node):
            return True
        if not is_op(node, *_CASTS, *_IDENTITIES, *_VIEWS, *_MUL, *_DIV, *_ADD, *_MASKED_FILL, aten.tanh, aten.where,
                     aten.sub):
            return False
        if is_op(node, aten.where):
            return _leads_to_scores(node.args[1], depth - 1) or _leads_to_scores(node.args[2], depth - 1)
        if is_op(node, *_ADD, *_MUL) and isinstance(node.args[1], fx.Node) and _leads_to_scores(node.args[1], depth - 1):
            return True
        node, depth = node.args[0], depth - 1
    return False


def _is_scalar(arg: Any) -> bool:
    return python_scalar(arg) is not None or is_symbolic_scalar(arg)


def _scalar_factor(node: fx.Node) -> Optional[tuple[fx.Node, tuple[Scalar, int]]]:
    """``x * c``, ``c * x`` or ``x / c`` with a scalar ``c`` → ``(x, (c, +1 for mul / -1 for div))``."""
    if not is_op(node, *_MUL, *_DIV) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_op(node, *_MUL) and _is_scalar(a):
        a, b = b, a
    if not isinstance(val(a), torch.Tensor) or not _is_scalar(b):
        return None
    return a, (b, 1 if is_op(node, *_MUL) else -1)


def _unit_tensor_factor(node: fx.Node) -> Optional[tuple[fx.Node, tuple[fx.Node, int]]]:
    """``x * t``, ``t * x`` or ``x / t`` with a one-element float tensor ``t`` (``torch.sqrt(
    torch.tensor(d))``) → ``(x, (t, ±1))``: a scale known only at run time, applied to q."""
    if not is_op(node, *_MUL, *_DIV) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_op(node, *_MUL) and not _leads_to_scores(a):
        a, b = b, a
    if not (isinstance(b, fx.Node) and isinstance(val(b), torch.Tensor) and val(b).dtype.is_floating_point
            and all(d == 1 for d in val(b).shape) and _leads_to_scores(a) and not _leads_to_scores(b)):
        return None
    return a, (b, 1 if is_op(node, *_MUL) else -1)


def _dense_users(node: fx.Node, reads: list) -> list[fx.Node]:
    """The users of ``node`` that read its values; those that read only its sizes, dtype or
    device go to ``reads`` (the rewrite points them elsewhere, so the node can die)."""
    reads += [u for u in node.users if is_metadata_read(u)]
    return [u for u in node.users if not is_metadata_read(u)]


def _walk_scores(x: fx.Node, reads: list) -> tuple[list, fx.Node, Optional[tuple[fx.Node, fx.Node]]]:
    """Score-chain events from the softmax input back to the Q·Kᵀ matmul (in forward order),
    and the sink column concatenated to the scores as ``(scores before the cat, sink)``."""
    events: list = []
    node = x
    at_softmax = True  # only casts and views so far: a row-max subtraction or a sink may sit here
    row_max, sink = None, None  # the row max read off ``node`` (its second user) and the sink
    while True:
        if len([u for u in _dense_users(node, reads) if u is not row_max]) != 1:
            raise NotFusable(f"the scores ({node.name}) are also used outside the attention")
        row_max = None
        if _is_qk_matmul(node):
            break
        if at_softmax and (peeled := _row_max_subtracted(node)) is not None:
            node, row_max = peeled
            continue
        if at_softmax and is_op(node, aten.cat):
            sink = _sink_column(node)
            node, at_softmax = sink[0], False
            continue
        at_softmax = at_softmax and is_op(node, *_CASTS, *_IDENTITIES, *_VIEWS)
        if is_op(node, *_CASTS):
            if not (dtype(node) and dtype(node).is_floating_point):
                raise NotFusable("the scores are cast to a non-float dtype")
            if torch.finfo(dtype(node)).eps > torch.finfo(dtype(node.args[0])).eps:
                raise NotFusable(f"the scores are rounded to {dtype(node)} before softmax")
            node = node.args[0]
        elif is_op(node, *_IDENTITIES):
            node = node.args[0]
        elif is_op(node, *_VIEWS):
            if shape(node)[-2:] != shape(node.args[0])[-2:]:
                raise NotFusable(f"{node.target} reshapes the query/key dims of the scores")
            events.append(("view", node))
            node = node.args[0]
        elif (softcap := _softcap(node)) is not None:
            events.append(("softcap", softcap[1]))
            node = softcap[0]
        elif (factor := _scalar_factor(node)) is not None:
            events.append(("scale", factor[1]))
            node = factor[0]
        elif (factor := _unit_tensor_factor(node)) is not None:
            events.append(("scale", factor[1]))
            node = factor[0]
        elif is_op(node, *_MUL, *_DIV):
            raise NotFusable(f"the scores are scaled by a tensor ({node.name}), not a scalar")
        elif is_op(node, *_ADD):
            if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
                raise NotFusable("add with alpha")
            a, b = node.args
            if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):
                raise NotFusable("a scalar is added to the scores")
            if not (_leads_to_scores(a) or _leads_to_scores(b)):
                raise NotFusable(f"no Q·Kᵀ matmul found behind {node.name}: the scores come from an unrecognized op")
            chain, other = (a, b) if _leads_to_scores(a) else (b, a)
            events.append(("bias", other, node))
            node = chain
        elif is_op(node, aten.sub) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 and \
                isinstance(node.args[1], fx.Node) and _leads_to_scores(node.args[0]) and \
                not _leads_to_scores(node.args[1]):  # s - t: t's negation is the bias
            events.append(("bias", _negated(node.args[1], node), node))
            node = node.args[0]
        elif is_op(node, *_MASKED_FILL):
            value = _fill_value(node.args[2], dtype(node))
            events.append(("fill", node.args[1], True, value, node))
            node = node.args[0]
        elif is_op(node, aten.where):
            cond, a, b = node.args
            if _leads_to_scores(a):
                events.append(("fill", cond, False, _fill_value(b, dtype(node)), node))
                node = a
            else:
                events.append(("fill", cond, True, _fill_value(a, dtype(node)), node))
                node = b
        else:
            raise NotFusable(f"{node.target} between Q·Kᵀ and softmax is not understood")
    events.reverse()
    return events, node, sink


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


def _check_sink(site: Site, scores: fx.Node, sink: fx.Node) -> None:
    """The sink column must be appended in the op's batch layout and broadcast over it."""
    batch = tuple(shape(site.batch_view if site.batch_view is not None else site.qk)[:-2])
    if tuple(shape(scores)[:-2]) != batch:
        raise NotFusable("the sink column is concatenated at another batch layout than the masks")
    sink_batch = tuple(shape(sink)[:-2])
    if len(sink_batch) > len(batch) or any(d != 1 and d != b for d, b in zip(reversed(sink_batch), reversed(batch))):
        raise NotFusable(f"the sinks {tuple(shape(sink))} do not broadcast to the scores' batch dims {batch}")
    if sink in writes_between(site.qk, site.pv):
        raise NotFusable(f"{sink.name} is modified in place after the scores read it")
    site.sink = sink


def _negated(t: fx.Node, before: fx.Node) -> fx.Node:
    """``-t`` as a node (with its ``val``) before ``before``; dead code if the site is not fused."""
    return insert_with_val(before, aten.neg.default, (t,))


def _fill_value(arg: Any, scores_dtype: torch.dtype) -> float:
    """The constant masked scores become, as stored in the scores' dtype (a float32 finfo.min
    written into bfloat16 scores is -inf)."""
    value = python_scalar(arg)
    while value is None and is_op(arg, aten.lift_fresh_copy, aten.clone, aten.detach, aten.detach_, *_CASTS) and shape(arg) == ():
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
    outer = _scalar_factor(node)
    if outer is None or not is_op(outer[0], aten.tanh) or outer[1][1] != 1:
        return None
    inner = _scalar_factor(outer[0].args[0])
    cap = python_scalar(outer[1][0])
    if inner is None or cap is None or len(outer[0].users) != 1:
        return None
    inner_c = python_scalar(inner[1][0])
    if inner_c is None or not math.isclose(inner_c ** -inner[1][1], cap, rel_tol=1e-6):
        return None
    return inner[0], abs(cap)  # tanh is odd: tanh(s / -c) * -c == tanh(s / c) * c


def _walk_probs(softmax: fx.Node, reads: list, with_sink: bool) -> fx.Node:
    """Forward from softmax to P·V; with a sink, through the slice that drops its column."""
    node, coarsest, sink_dropped = softmax, dtype(softmax), not with_sink
    while True:
        users = _dense_users(node, reads)
        user = users[0] if len(users) == 1 else None
        if user is None:
            raise NotFusable("the attention probabilities are also used outside the attention")
        if _is_scores_matmul(user):
            if not sink_dropped:
                raise NotFusable("the sink column's probability reaches P·V (no slice drops it)")
            first = user.args[1][0] if is_op(user, aten.einsum) else user.args[0]
            if first is not node:
                raise NotFusable("the probabilities are the second matmul operand (P is not multiplied into V)")
            if torch.finfo(coarsest).eps > torch.finfo(dtype(user)).eps:
                raise NotFusable(f"the probabilities are rounded to {coarsest} before a {dtype(user)} P·V")
            return user
        if is_op(user, *_CASTS) and dtype(user).is_floating_point and torch.finfo(dtype(user)).eps > torch.finfo(coarsest).eps:
            coarsest = dtype(user)
        if is_op(user, aten.dropout):
            p, train = user.args[1], user.args[2] if len(user.args) > 2 else user.kwargs.get("train")
            if train and p:
                raise NotFusable(f"dropout in training mode (p={p}) after softmax")
        elif is_op(user, *_VIEWS):
            if shape(user)[-2:] != shape(node)[-2:]:
                raise NotFusable("a view reshapes the query/key dims of the probabilities")
        elif not sink_dropped and _drops_last_column(user):
            sink_dropped = True
        elif is_op(user, aten.slice, aten.narrow):
            raise NotFusable("a slice of the probabilities other than dropping a sink column")
        elif not is_op(user, *_CASTS, *_IDENTITIES):
            raise NotFusable(f"{user.target} is applied to the probabilities")
        node = user


def _drops_last_column(node: fx.Node) -> bool:
    """``p[..., :-1]`` (``slice(p, -1, 0, -1)``) or ``p.narrow(-1, 0, n - 1)``."""
    if not is_op(node, aten.slice, aten.narrow):
        return False
    p = node.args[0]
    rank, size = len(shape(p)), shape(p)[-1]
    args = list(node.args[1:]) + [None] * 4
    if normalize_dim(args[0] if args[0] is not None else 0, rank) != rank - 1 or args[1] not in (None, 0):
        return False
    if is_op(node, aten.narrow):
        return args[2] is not None and _same(args[2], size - 1)
    return (args[3] in (None, 1)) and args[2] is not None and (args[2] == -1 or _same(args[2], size - 1))


def _same(a: Any, b: Any) -> bool:
    """Sizes known equal (ints, or symbolic sizes) without adding a guard."""
    return isinstance(a, (int, torch.SymInt)) and statically_known_true(a == b)


def _peel_scales(node: fx.Node, site: Site) -> fx.Node:
    """Fold ``x * c`` into the scale and read ``x`` — unless ``x`` is written in place."""
    while (factor := _scalar_factor(node)) is not None and not {node, factor[0]} & site.mutated:
        site.scale.append(factor[1])
        node = factor[0]
    return node


def _is_last_transpose(node: fx.Node) -> bool:
    """``x.transpose(-2, -1)``, ``x.mT``, ``x.t()`` or a permute that swaps only the last two dims."""
    rank = len(shape(node) or ())
    if is_op(node, aten.transpose):
        return sorted(normalize_dim(d, rank) for d in node.args[1:3]) == [rank - 2, rank - 1]
    if is_op(node, aten.mT, aten.t):
        return True
    if is_op(node, aten.permute):
        return [normalize_dim(d, rank) for d in node.args[1]] == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _read_qk(site: Site) -> None:
    mm = site.qk
    if is_op(mm, aten.einsum):
        q_perm, k_perm, _ = _einsum_layout(_expand_ellipsis(mm), first_is_probs=False)
        a, b = mm.args[1]
        site.q = Operand(_peel_scales(a, site), q_perm)
        site.k = Operand(_peel_scales(b, site), k_perm)
        return
    a, b = (mm.args[1], mm.args[2]) if is_op(mm, aten.baddbmm) else (mm.args[0], mm.args[1])
    if len(shape(a)) < 2 or len(shape(b)) < 2:
        raise NotFusable("Q·Kᵀ has a 1-D operand")
    a = _peel_scales(a, site)
    b = _peel_scales(b, site)
    if _is_last_transpose(b) and not {b, b.args[0]} & site.mutated:
        site.k = Operand(_peel_scales(b.args[0], site))
    else:
        site.k = Operand(b, transpose_last=True)
    site.q = Operand(a)


def _read_pv(site: Site) -> None:
    mm = site.pv
    if is_op(mm, aten.einsum):
        _, v_perm, out_perm = _einsum_layout(_expand_ellipsis(mm), first_is_probs=True)
        site.v = Operand(mm.args[1][1], v_perm)
        site.out_permute = out_perm
    else:
        site.v = Operand(mm.args[1])


def _expand_ellipsis(mm: fx.Node) -> str:
    """An einsum equation with ``...`` spelled out as letters (from the operands' ranks)."""
    equation = mm.args[0].replace(" ", "")
    if "..." not in equation:
        return equation
    lhs, _, out = equation.partition("->")
    parts = lhs.split(",")
    if not out or len(parts) != len(mm.args[1]):
        return equation
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    batch = max(len(shape(t)) - (len(p) - 3) for p, t in zip(parts, mm.args[1]) if "..." in p)
    letters = "".join(spare[:batch])
    spell = lambda p, t: p.replace("...", letters[batch - (len(shape(t)) - (len(p) - 3)):])  # noqa: E731
    parts = [spell(p, t) if "..." in p else p for p, t in zip(parts, mm.args[1])]
    return ",".join(parts) + "->" + out.replace("...", letters)


def _einsum_layout(equation: str, first_is_probs: bool):
    """Permutations putting each einsum operand in ``[*batch, seq, dim]`` order.

    Q·Kᵀ: ``X,Y->Z`` with Z = batch + (i, j), X = batch + {i, c}, Y = batch + {j, c}.
    P·V:  ``X,Y->Z`` with X = batch + (i, j), Y = batch + {j, e}, Z = batch + {i, e}.
    Returns ``(perm of X, perm of Y, perm from canonical output to Z or None)``.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise NotFusable(f"einsum {equation!r} (implicit output or ellipsis)")
    lhs, z = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2 or any(len(set(p)) != len(p) for p in (*parts, z)):
        raise NotFusable(f"einsum {equation!r} is not a two-operand contraction")
    x, y = parts
    contracted = [c for c in x if c in y and c not in z]
    if len(contracted) != 1:
        raise NotFusable(f"einsum {equation!r} does not contract exactly one dim")
    c = contracted[0]
    if not first_is_probs:
        batch = list(z[:-2])
        i, j = z[-2], z[-1]
        want_x, want_y = batch + [i, c], batch + [j, c]
        out_perm = None
    else:
        batch, i, j = list(x[:-2]), x[-2], x[-1]
        if j != c:
            raise NotFusable(f"einsum {equation!r} does not contract the key dim")
        e = [d for d in y if d not in batch and d != j]
        if len(e) != 1:
            raise NotFusable(f"einsum {equation!r}: V must be batch + (key, value_dim)")
        want_x, want_y = batch + [i, j], batch + [j, e[0]]
        canonical_out = batch + [i, e[0]]
        if sorted(z) != sorted(canonical_out):
            raise NotFusable(f"einsum {equation!r}: unexpected output dims")
        out_perm = None if list(z) == canonical_out else [canonical_out.index(d) for d in z]
    if sorted(x) != sorted(want_x) or sorted(y) != sorted(want_y):
        raise NotFusable(f"einsum {equation!r} is not attention-shaped")
    perm = lambda have, want: None if list(have) == want else [have.index(d) for d in want]  # noqa: E731
    return perm(x, want_x), perm(y, want_y), out_perm
