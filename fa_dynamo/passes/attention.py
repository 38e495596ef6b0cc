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

A site with anything not exactly understood is left alone and reported with the reason.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.mask_lifting import Offset, Select, lift_hidden_set
from fa_dynamo.passes.matching import (
    aten, describe, dtype, is_op, is_symbolic_scalar, mutated_nodes, normalize_dim, only_user, python_scalar,
    round_to, shape, val, writes_between,
)

_MATMULS = (aten.matmul, aten.bmm, aten.einsum)
_CASTS = (aten.to, aten._to_copy, aten.type_as)
_IDENTITIES = (aten.clone, aten.contiguous, aten.alias)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)
# In-place forms count as their functional forms in the score chain: each chain node has one
# user, so nothing else sees the scores before or after the write.
_MUL, _DIV, _ADD = (aten.mul, aten.mul_), (aten.div, aten.div_), (aten.add, aten.add_)
_MASKED_FILL = (aten.masked_fill, aten.masked_fill_)
# A finite additive mask value this negative absorbs any score in float32/bfloat16
# (s + v == v), so adding it is the same as replacing the score by it.
_ABSORBING = -1e30


class NotFusable(Exception):
    """Raised inside matching with the reason a site is left alone."""


Scalar = Union[float, fx.Node]


@dataclass
class _Operand:
    """A matmul operand in canonical layout ``[*batch, seq, dim]`` plus how to get there."""

    node: fx.Node
    permute: Optional[list[int]] = None  # applied to ``node`` first
    transpose_last: bool = False  # then swap the last two dims


@dataclass
class _Site:
    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: _Operand = None
    k: _Operand = None
    v: _Operand = None
    out_permute: Optional[list[int]] = None
    scale: list[tuple[Scalar, int]] = field(default_factory=list)  # (factor, +1 mul / -1 div)
    softcap: float = 0.0
    biases: list[fx.Node] = field(default_factory=list)
    masks: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (bool node, True=hidden where True)
    fill: Optional[float] = None
    band_lo: Optional[Offset] = None
    band_hi: Optional[Offset] = None
    batch_view: Optional[fx.Node] = None  # a chain view that fixes the canonical batch dims
    lifted: int = 0
    mutated: frozenset = frozenset()  # nodes written in place somewhere: never read around them
    relayout: set = field(default_factory=set)  # biases to reshape to the op's batch layout


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
        mutated = frozenset(mutated_nodes(graph))
        for softmax in list(graph.nodes):
            if not is_op(softmax, aten.softmax, aten._softmax) or softmax.graph is not graph:
                continue
            try:
                site = _match(softmax, mutated)
                _rewrite(graph, site, config)
            except NotFusable as e:
                report.sites.append(SiteReport(describe(softmax), False, str(e)))
                graph.eliminate_dead_code()  # drop nodes a refused rewrite had started
                continue
            report.sites.append(SiteReport(describe(softmax), True, mask=_mask_kind(site), kernel=config.kernel))
            graph.eliminate_dead_code()


def _mask_kind(site: _Site) -> str:
    """A short name for what the op received: causal / window / band / padding / dense / bias."""
    parts = []
    if site.band_lo is not None or site.band_hi is not None:
        parts.append("window" if site.band_lo is not None and site.band_hi is not None else
                     "causal" if site.band_hi is not None else "band")
    if site.masks:
        small = all(shape(m) is not None and (len(shape(m)) < 2 or shape(m)[-2] == 1) for m, _ in site.masks)
        parts.append("padding" if small else "dense")
    if site.biases:
        parts.append("bias")
    return "+".join(parts) or "none"


# --- matching ---------------------------------------------------------------------------------


def _match(softmax: fx.Node, mutated: frozenset) -> _Site:
    x = softmax.args[0]
    rank = len(shape(x) or ())
    if rank < 2 or normalize_dim(softmax.args[1], rank) != rank - 1:
        raise NotFusable("softmax is not over the last dim")
    events, qk = _walk_scores(x)
    if is_op(qk, aten.baddbmm):  # beta * bias + alpha * (q @ kᵀ)
        beta, alpha = qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
        if beta not in (0, 1) or python_scalar(alpha) is None:
            raise NotFusable(f"baddbmm with beta={beta}, alpha={alpha}")
        events = [("scale", (alpha, 1))] + ([("bias", qk.args[0], qk)] if beta == 1 else []) + events
    pv = _walk_probs(softmax)
    site = _Site(softmax, qk, pv, mutated=mutated)
    _read_qk(site)
    _read_pv(site)
    if {site.q.node, site.k.node} & writes_between(qk, pv):
        raise NotFusable("q or k is modified in place between Q·Kᵀ and P·V")
    _fold_events(site, events)
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
        if not is_op(node, *_CASTS, *_IDENTITIES, *_VIEWS, *_MUL, *_DIV, *_ADD, *_MASKED_FILL, aten.tanh, aten.where):
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


def _walk_scores(x: fx.Node) -> tuple[list, fx.Node]:
    """Score-chain events from the softmax input back to the Q·Kᵀ matmul (in forward order)."""
    events: list = []
    node = x
    while True:
        if len(node.users) != 1:
            raise NotFusable(f"the scores ({node.name}) are also used outside the attention")
        if _is_qk_matmul(node):
            break
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
        elif is_op(node, *_MUL, *_DIV):
            raise NotFusable(f"the scores are scaled by a tensor ({node.name}), not a scalar")
        elif is_op(node, *_ADD):
            if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
                raise NotFusable("add with alpha")
            a, b = node.args
            if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):
                raise NotFusable("a scalar is added to the scores")
            chain, other = (a, b) if _leads_to_scores(a) else (b, a)
            events.append(("bias", other, node))
            node = chain
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
    return events, node


def _fill_value(arg: Any, scores_dtype: torch.dtype) -> float:
    """The constant masked scores become, as stored in the scores' dtype (a float32 finfo.min
    written into bfloat16 scores is -inf)."""
    value = python_scalar(arg)
    if value is None and isinstance(arg, fx.Node) and is_op(arg, aten.scalar_tensor, aten.full) and shape(arg) == ():
        value = python_scalar(arg.args[0] if is_op(arg, aten.scalar_tensor) else arg.args[1])
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
    return inner[0], cap


def _walk_probs(softmax: fx.Node) -> fx.Node:
    node = softmax
    while True:
        user = only_user(node)
        if user is None:
            raise NotFusable("the attention probabilities are also used outside the attention")
        if _is_scores_matmul(user):
            first = user.args[1][0] if is_op(user, aten.einsum) else user.args[0]
            if first is not node:
                raise NotFusable("the probabilities are the second matmul operand (P is not multiplied into V)")
            return user
        if is_op(user, aten.dropout):
            p, train = user.args[1], user.args[2] if len(user.args) > 2 else user.kwargs.get("train")
            if train and p:
                raise NotFusable(f"dropout in training mode (p={p}) after softmax")
        elif is_op(user, *_VIEWS):
            if shape(user)[-2:] != shape(node)[-2:]:
                raise NotFusable("a view reshapes the query/key dims of the probabilities")
        elif not is_op(user, *_CASTS, *_IDENTITIES):
            raise NotFusable(f"{user.target} is applied to the probabilities")
        node = user


def _peel_scales(node: fx.Node, site: _Site) -> fx.Node:
    while node not in site.mutated and (factor := _scalar_factor(node)) is not None:
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


def _read_qk(site: _Site) -> None:
    mm = site.qk
    if is_op(mm, aten.einsum):
        q_perm, k_perm, _ = _einsum_layout(mm.args[0], first_is_probs=False)
        a, b = mm.args[1]
        site.q = _Operand(_peel_scales(a, site), q_perm)
        site.k = _Operand(_peel_scales(b, site), k_perm)
        return
    a, b = (mm.args[1], mm.args[2]) if is_op(mm, aten.baddbmm) else (mm.args[0], mm.args[1])
    if len(shape(a)) < 2 or len(shape(b)) < 2:
        raise NotFusable("Q·Kᵀ has a 1-D operand")
    a = _peel_scales(a, site)
    b = _peel_scales(b, site)
    if _is_last_transpose(b) and b not in site.mutated:
        site.k = _Operand(_peel_scales(b.args[0], site))
    else:
        site.k = _Operand(b, transpose_last=True)
    site.q = _Operand(a)


def _read_pv(site: _Site) -> None:
    mm = site.pv
    if is_op(mm, aten.einsum):
        _, v_perm, out_perm = _einsum_layout(mm.args[0], first_is_probs=True)
        site.v = _Operand(mm.args[1][1], v_perm)
        site.out_permute = out_perm
    else:
        site.v = _Operand(mm.args[1])


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


# --- folding the score chain into the op's order ------------------------------------------


def _fold_events(site: _Site, events: list) -> None:
    """Check the chain is ``scale* → softcap? → (bias | fill)*`` and collect the pieces."""
    stage = 0  # 0: scaling allowed, 1: after softcap, 2: after a bias or fill
    site.batch_view = _mask_layout(site.qk, events)
    layout = site.qk  # the node whose shape is the scores' layout at this point of the chain
    seen_fill = False
    biases_left = sum(e[0] == "bias" for e in events)
    for event in events:
        kind = event[0]
        if kind == "view":
            layout = event[1]
            continue
        if kind == "scale":
            if stage > 0:
                raise NotFusable("the scores are scaled after a softcap, bias or mask")
            site.scale.append(event[1])
            continue
        if kind == "softcap":
            if stage > 0:
                raise NotFusable("softcap after a bias or mask")
            site.softcap, stage = event[1], 1
            continue
        if len(shape(layout)) > 4:
            raise NotFusable("scores with more than two batch dims")
        if shape(site.batch_view) != shape(layout):
            _relayout_bias(site, event, layout)
        stage = 2
        if event[1] in writes_between(event[-1], site.pv):
            raise NotFusable(f"{event[1].name} is modified in place after the scores read it")
        if kind == "bias":
            if seen_fill and site.fill != float("-inf"):
                raise NotFusable("a bias is added after the scores were filled with a finite value")
            biases_left -= 1
            _add_bias(site, event[1], event[2], shape(layout), later_biases=biases_left)
        else:
            seen_fill = True
            _add_fill(site, event[1], event[2], event[3], shape(layout))


def _mask_layout(qk: fx.Node, events: list) -> Optional[fx.Node]:
    """The scores' layout the op adopts: where masks apply, the one with the most batch dims."""
    layout, best = qk, None
    for event in events:
        if event[0] == "view":
            layout = event[1]
        elif event[0] in ("bias", "fill") and (best is None or len(shape(layout)) >= len(shape(best))):
            best = layout
    return best


def _relayout_bias(site: _Site, event: tuple, layout: fx.Node) -> None:
    """A bias added at another batch layout (``[B*H, ...]`` vs ``[B, H, ...]``) is reshaped to
    the op's, which is exact when it spans its layout's batch dims (no broadcasting there)."""
    bias, have, want = event[1], tuple(shape(layout)[:-2]), tuple(shape(site.batch_view)[:-2])
    if event[0] != "bias" or tuple(shape(bias)[:-2]) != have or math.prod(have) != math.prod(want):
        raise NotFusable("masks are applied at two different batch layouts of the scores")
    site.relayout.add(bias)


def _set_fill(site: _Site, value: float) -> None:
    if site.fill is not None and site.fill != value:
        raise NotFusable(f"two masks fill with different values ({site.fill} and {value})")
    site.fill = value


def _add_band(site: _Site, visible) -> bool:
    """Intersect the site's band with a lifted visible set; False if it is not one band."""
    if visible.complement:
        return False
    for attr, new, pick in (("band_lo", visible.lo, max), ("band_hi", visible.hi, min)):
        old = getattr(site, attr)
        if new is None:
            continue
        if old is None or old == new:
            setattr(site, attr, new)
        elif old.is_static and new.is_static:
            setattr(site, attr, Offset(pick(old.const, new.const)))
        else:
            return False
    site.lifted += 1
    return True


def _lift_band(site: _Site, hidden_set, dense: tuple, hidden_is_complement: bool, value: float, scores_shape) -> bool:
    """Record ``hidden = ~(visible ∧ dense)`` as a band plus dense key masks; False if it is not."""
    if not hidden_is_complement:
        if dense:
            return False
        visible = hidden_set.invert()
    else:
        visible = hidden_set
    if site.fill is not None and site.fill != value:
        return False
    saved = (site.band_lo, site.band_hi, site.lifted)
    if not _add_band(site, visible):
        site.band_lo, site.band_hi, site.lifted = saved
        return False
    _set_fill(site, float(value))
    site.masks.extend((_aligned(site, d, scores_shape), False) for d in dense)
    return True


def _add_bias(site: _Site, bias: fx.Node, add_node: fx.Node, scores_shape: tuple, later_biases: int) -> None:
    """An additive tensor: a lifted band when it only hides keys, a dense bias otherwise.

    ``s + v`` equals the op's "replace by v" when v is -inf, or a finite v so negative that it
    absorbs the score — and no bias is added afterwards (``s + v + b`` is not ``v``).
    """
    lifted, _ = lift_hidden_set(bias, scores_shape, site.mutated)
    if lifted is not None and 0 in (lifted.inside, lifted.outside) and lifted.inside != lifted.outside:
        value = round_to(lifted.outside if lifted.inside == 0 else lifted.inside, dtype(add_node))
        absorbing = value == float("-inf") or (
            value <= _ABSORBING and dtype(add_node) in (torch.float32, torch.bfloat16) and not later_biases
        )
        # value sits outside (where ∧ dense) when inside == 0: hidden is the complement
        if absorbing and _lift_band(site, lifted.where, lifted.dense, lifted.inside == 0, value, scores_shape):
            return
    if not dtype(bias) or not dtype(bias).is_floating_point:
        raise NotFusable(f"a non-float tensor ({bias.name}) is added to the scores")
    site.biases.append(_aligned(site, bias, scores_shape))


def _add_fill(site: _Site, cond: fx.Node, hidden_where_true: bool, value: float, scores_shape: tuple) -> None:
    if dtype(cond) != torch.bool:
        raise NotFusable("masked_fill/where with a non-bool condition")
    lifted, _ = lift_hidden_set(cond, scores_shape, site.mutated)
    if lifted is not None and isinstance(lifted.inside, bool) and lifted.inside != lifted.outside:
        # cond is True on (where ∧ dense) if inside is True, else on its complement
        cond_is_set = lifted.inside
        if _lift_band(site, lifted.where, lifted.dense, cond_is_set != hidden_where_true, value, scores_shape):
            return
    _set_fill(site, value)
    site.masks.append((_aligned(site, cond, scores_shape), hidden_where_true))


def _aligned(site: _Site, tensor: fx.Node, scores_shape: tuple) -> fx.Node:
    """``tensor`` itself, after checking it broadcasts to the scores without re-tiling."""
    t_shape = shape(tensor)
    if t_shape is None or len(t_shape) > len(scores_shape):
        raise NotFusable(f"{tensor.name} does not broadcast to the scores")
    for d, s in zip(reversed(t_shape), reversed(scores_shape)):
        if d != 1 and d != s:
            raise NotFusable(f"{tensor.name} of shape {tuple(t_shape)} does not broadcast to the scores {tuple(scores_shape)}")
    return tensor


# --- rewriting ----------------------------------------------------------------------------


def _canonical_batch(site: _Site) -> tuple:
    """The op's (B, H) layout: the scores' batch dims where masks apply, else Q·Kᵀ's."""
    ref = site.batch_view if site.batch_view is not None else site.qk
    return tuple(shape(ref)[:-2])


def _output_layout(site: _Site) -> Optional[Union[str, list]]:
    """How the op's ``[B, H, Sq, Dv]`` output becomes P·V's: None (as is), ``"flatten"``
    (``[B*H, ...]``) or a static shape to reshape to."""
    batch = _canonical_batch(site)
    probs = site.pv.args[1][0] if is_op(site.pv, aten.einsum) else site.pv.args[0]
    have = tuple(shape(probs)[:-2])
    if have == batch:
        return None
    if site.out_permute is None:
        if len(have) == 1 and len(batch) == 2:
            return "flatten"
        out_shape = shape(site.pv)
        if all(isinstance(d, int) for d in (*have, *batch, *out_shape)) and math.prod(have) == math.prod(batch):
            return list(out_shape)
    raise NotFusable(f"the probabilities have batch dims {have}, the masked scores {batch}")


def _batch_sizes(graph: fx.Graph, site: _Site) -> list:
    """The canonical batch sizes as graph values (ints, or SymInt nodes that outlive the site)."""
    batch = _canonical_batch(site)
    if all(isinstance(d, int) for d in batch):
        return list(batch)
    if site.batch_view is not None and is_op(site.batch_view, aten.view, aten.reshape, aten._unsafe_view):
        sizes = list(site.batch_view.args[1])[: len(batch)]
        if all(isinstance(s, (int, fx.Node)) for s in sizes) and -1 not in sizes:
            return sizes
    q_node, perm = site.q.node, site.q.permute or list(range(len(shape(site.q.node))))
    if tuple(_operand_batch(site.q)) == batch:
        return [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (q_node, perm[i]))
                for i, d in enumerate(batch)]
    raise NotFusable("symbolic batch sizes that cannot be recovered")


def _kv_heads(op: _Operand, site: _Site) -> Any:
    """Key/value heads the op would receive for ``op`` if grouping is allowed."""
    batch = _canonical_batch(site)
    undone = _undo_repeat_kv(op, batch, site.mutated)
    if undone is not None:
        return shape(undone)[1]
    node_batch = _operand_batch(op)
    if len(node_batch) == len(batch) == 2 and node_batch[0] == batch[0] and node_batch[1] == 1:
        return 1
    return batch[-1] if batch else 1


def _emit_operand(graph: fx.Graph, op: _Operand, site: _Site, sizes: list, role: str, grouped: bool = True) -> fx.Node:
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


def _operand_batch(op: _Operand) -> tuple:
    s = shape(op.node)
    if op.permute is not None:
        s = tuple(s[i] for i in op.permute)
    return tuple(s[:-2])


def _reshape_batch(graph, node, have: tuple, want: tuple, sizes: list, role: str) -> fx.Node:
    if math.prod(have) != math.prod(want):
        raise NotFusable(f"{role} has batch dims {have}, the scores {want}")
    last = [-1, graph.call_function(aten.sym_size.int, (node, -1))]
    return graph.call_function(aten.reshape.default, (node, list(sizes) + last))


def _undo_repeat_kv(op: _Operand, batch: tuple, mutated: frozenset) -> Optional[fx.Node]:
    """``repeat_kv(x, n)`` (unsqueeze → expand → reshape) or ``repeat_interleave(x, n, 1)`` → x."""
    if op.permute is not None or op.transpose_last or len(batch) != 2 or op.node in mutated:
        return None
    node = op.node
    if is_op(node, aten.repeat_interleave) and len(node.args) >= 3 and node.args[2] in (1, -3):
        src = node.args[0]
        return src if isinstance(node.args[1], int) and len(shape(src)) == 4 else None
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
        return None
    expand = node.args[0]
    if not is_op(expand, aten.expand):
        return None
    unsq = expand.args[0]
    skipped = []
    while _is_full_slice(unsq):  # x[:, :, None, :, :] under dynamic shapes adds no-op slices
        skipped.append(unsq)
        unsq = unsq.args[0]
    if not is_op(unsq, aten.unsqueeze) or set(skipped) & mutated:
        return None
    src = unsq.args[0]
    if len(shape(src) or ()) != 4 or normalize_dim(unsq.args[1], 5) != 2:
        return None
    e = shape(expand)
    b, hkv, s, d = shape(src)
    if len(e) != 5 or (e[0], e[1], e[3], e[4]) != (b, hkv, s, d) or shape(node) != (b, hkv * e[2], s, d):
        return None
    return None if {src, unsq, expand} & mutated else src


def _is_full_slice(node: Any) -> bool:
    """``x[:, ..., :]`` along one dim: start 0, step 1, end at or past the dim's size."""
    if not is_op(node, aten.slice):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
    size = shape(node.args[0])[dim]
    return start == 0 and step == 1 and (end is None or end >= 2**62 or end == size)


def _emit_scale(graph: fx.Graph, site: _Site) -> Scalar:
    if not site.scale:
        return 1.0
    if all(python_scalar(f) is not None for f, _ in site.scale):
        return math.prod(python_scalar(f) ** p for f, p in site.scale)
    result: Scalar = 1.0
    for f, p in site.scale:
        result = graph.call_function(operator.mul if p == 1 else operator.truediv, (result, f))
    return result


def _rewrite(graph: fx.Graph, site: _Site, config: FastAttentionConfig) -> None:
    pv = site.pv
    out_layout = _output_layout(site)
    batch = _canonical_batch(site)
    in_dtypes = [dtype(op.node) for op in (site.q, site.k, site.v)]
    op_dtype = in_dtypes[0]
    for d in in_dtypes[1:]:
        op_dtype = torch.promote_types(op_dtype, d)
    with graph.inserting_before(pv):
        sizes = _batch_sizes(graph, site)
        grouped = _kv_heads(site.k, site) == _kv_heads(site.v, site)
        q, k, v = (_emit_operand(graph, op, site, sizes, role, grouped)
                   for op, role in ((site.q, "q"), (site.k, "k"), (site.v, "v")))
        if len(set(in_dtypes)) > 1:
            q, k, v = (graph.call_function(aten.to.dtype, (t, op_dtype)) for t in (q, k, v))
        bias = _combine(graph, [_relayout(graph, b, sizes) if b in site.relayout else _to_4d(graph, b)
                                for b in site.biases], aten.add.Tensor)
        hidden = [
            _to_4d(graph, m) if where_true else graph.call_function(aten.bitwise_not.default, (_to_4d(graph, m),))
            for m, where_true in site.masks
        ]
        mask = _combine(graph, hidden, aten.bitwise_or.Tensor)
        fill = float("-inf") if site.fill is None else site.fill
        lo = None if site.band_lo is None else site.band_lo.emit(graph)
        hi = None if site.band_hi is None else site.band_hi.emit(graph)
        op = graph.call_function(
            torch.ops.fa_dynamo.attention.default,
            (q, k, v, bias, mask, _emit_scale(graph, site), site.softcap, fill, lo, hi,
             config.kernel, config.block_q, config.block_k),
        )
        out = graph.call_function(operator.getitem, (op, 0))
        for _ in range(2 - len(batch)):
            out = graph.call_function(aten.squeeze.dim, (out, 0))
        if out_layout == "flatten":
            out = graph.call_function(aten.flatten.using_ints, (out, 0, 1))
        elif out_layout is not None:
            out = graph.call_function(aten.reshape.default, (out, out_layout))
        if site.out_permute is not None:
            out = graph.call_function(aten.permute.default, (out, site.out_permute))
        if dtype(pv) != op_dtype:
            out = graph.call_function(aten.to.dtype, (out, dtype(pv)))
    pv.replace_all_uses_with(out)


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
