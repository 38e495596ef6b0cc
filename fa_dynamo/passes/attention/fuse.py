"""The attention pass: ``softmax(Q·Kᵀ ⊕ ...) · V`` → ``fa_dynamo::attention``.

Structural matching, not a list of patterns. From every softmax over the last dim:

1. walk back through the *score chain* — casts, batch-only views, scalar scale (``mul``/``div``),
   tanh softcap, additive bias (``add``), masks (``masked_fill``/``where``) — to a matmul
   (``matmul``/``bmm``/``einsum``) of two operands;
2. walk forward through casts, eval-mode dropout and batch-only views to the matmul with V;
3. read q and k off the first matmul (undoing a transpose of k, peeling scalar scales, undoing
   ``repeat_kv`` / ``repeat_interleave`` so GQA reaches the op without copies) and v off the
   second;
4. lift every mask whose structure is recognized (``fa_dynamo.passes.attention.mask_lifting``) into a band;
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
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.attention.rewrite import rewrite
from fa_dynamo.passes.attention.site import NotFusable, Operand, Site
from fa_dynamo.passes.attention.score_chain import fold_events, settle_alibi
from fa_dynamo.passes.attention.score_walk import (
    Bias, Scale, dense_users, is_qk_matmul, is_scores_matmul, scalar_factor, walk_scores,
)
from fa_dynamo.passes.attention.sdpa import expand_sdpa, is_sdpa
from fa_dynamo.passes.attention.manual_softmax import canonicalize_manual_softmax
from fa_dynamo.passes.matching import (
    CASTS, DIV, IDENTITIES, MASKED_FILL, MUL, VIEWS, aten, describe, dtype, is_op, is_symbolic_scalar, known_equal,
    mutated_nodes, normalize_dim, python_scalar, shape, val, writes_between,
)

log = logging.getLogger(__name__)



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
_PROBS_CHAIN = (*CASTS, *IDENTITIES, *VIEWS, *MUL, *DIV, *MASKED_FILL, aten.where, aten.expand,
                aten.dropout, aten.slice, aten.narrow)


def _is_candidate(softmax: fx.Node) -> bool:
    """A softmax with a Q·Kᵀ-like matmul behind it (through any ops but a linear layer) and a
    matmul after it (through the ops a probability chain is made of). Others (MoE routers:
    ``softmax(linear(h))`` → ``topk``) are not attention and not reported as sites."""
    return (_reaches(softmax.args[0], lambda n: n.all_input_nodes, is_qk_matmul,
                     lambda n: not is_op(n, *_LINEAR), depth=12)
            and _reaches(softmax, lambda n: list(n.users), is_scores_matmul,
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
    events, qk, sink = walk_scores(x, reads)
    if is_op(qk, aten.baddbmm):  # beta * bias + alpha * (q @ kᵀ)
        beta, alpha = qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
        if beta not in (0, 1) or (python_scalar(alpha) is None and not is_symbolic_scalar(alpha)):
            raise NotFusable(f"baddbmm with beta={beta}, alpha={alpha}")
        bias = qk.args[0]
        zeros = is_op(bias, aten.zeros, aten.new_zeros, aten.zeros_like, aten.zero, aten.zero_) or (
            is_op(bias, aten.full) and bias.args[1] == 0)  # torch.empty(..).zero_() too
        events = [Scale(alpha, 1)] + ([Bias(bias, qk)] if beta == 1 and not zeros else []) + events
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


def _walk_probs(softmax: fx.Node, reads: list, with_sink: bool) -> fx.Node:
    """Forward from softmax to P·V; with a sink, through the slice that drops its column."""
    node, coarsest, sink_dropped = softmax, dtype(softmax), not with_sink
    while True:
        users = dense_users(node, reads)
        user = users[0] if len(users) == 1 else None
        if user is None:
            raise NotFusable("the attention probabilities are also used outside the attention")
        if is_scores_matmul(user):
            if not sink_dropped:
                raise NotFusable("the sink column's probability reaches P·V (no slice drops it)")
            first = user.args[1][0] if is_op(user, aten.einsum) else user.args[0]
            if first is not node:
                raise NotFusable("the probabilities are the second matmul operand (P is not multiplied into V)")
            if torch.finfo(coarsest).eps > torch.finfo(dtype(user)).eps:
                raise NotFusable(f"the probabilities are rounded to {coarsest} before a {dtype(user)} P·V")
            return user
        if is_op(user, *CASTS) and dtype(user).is_floating_point and torch.finfo(dtype(user)).eps > torch.finfo(coarsest).eps:
            coarsest = dtype(user)
        if is_op(user, aten.dropout):
            p, train = user.args[1], user.args[2] if len(user.args) > 2 else user.kwargs.get("train")
            if train and p:
                raise NotFusable(f"dropout in training mode (p={p}) after softmax")
        elif is_op(user, *VIEWS):
            if shape(user)[-2:] != shape(node)[-2:]:
                raise NotFusable("a view reshapes the query/key dims of the probabilities")
        elif not sink_dropped and _drops_last_column(user):
            sink_dropped = True
        elif is_op(user, aten.slice, aten.narrow):
            raise NotFusable("a slice of the probabilities other than dropping a sink column")
        elif not is_op(user, *CASTS, *IDENTITIES):
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
        return args[2] is not None and known_equal(args[2], size - 1)
    return (args[3] in (None, 1)) and args[2] is not None and (args[2] == -1 or known_equal(args[2], size - 1))


def _peel_scales(node: fx.Node, site: Site) -> fx.Node:
    """Fold ``x * c`` into the scale and read ``x`` — unless ``x`` is written in place."""
    while (factor := scalar_factor(node)) is not None and not {node, factor[0]} & site.mutated:
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
