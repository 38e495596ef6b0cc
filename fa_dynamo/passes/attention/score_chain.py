"""Folding the score chain into the op's fixed order: scale → softcap → bias → fill.

Each event between Q·Kᵀ and softmax (a scale, a softcap, an additive tensor, a masked fill)
is checked against that order and turned into the op's arguments; masks whose structure is
recognized (``mask_lifting``) become the band, the rest stay dense tensors.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fa_dynamo.passes.attention.site import AlibiTerm, NotFusable, Site
from fa_dynamo.passes.attention.mask_lifting import Offset, lift_hidden_set, lift_slope
from fa_dynamo.passes.attention.score_walk import Bias, Fill, Scale, ScoreEvent, Softcap, View
from fa_dynamo.passes.matching import (
    aten, dtype, insert_with_val, is_op, python_scalar, round_to, shape, val, writes_between,
)

# A finite additive mask value this negative absorbs any score in float32/bfloat16
# (s + v == v), so adding it is the same as replacing the score by it.
_ABSORBING = -1e30


def fold_events(site: Site, events: list[ScoreEvent]) -> None:
    """Check the chain is ``scale* → softcap? → (bias | fill)*`` and collect the pieces."""
    events = _finite_fills_as_biases(site, _scales_first(events))
    stage = 0  # 0: scaling allowed, 1: after softcap, 2: after a bias or fill
    site.batch_view = _mask_layout(site.qk, events)
    layout = site.qk  # the node whose shape is the scores' layout at this point of the chain
    other_biases = sum(isinstance(e, Bias) for e in events) - 1
    for event in events:
        if isinstance(event, View):
            layout = event.node
            continue
        if isinstance(event, Scale):
            if stage > 0:
                raise NotFusable("the scores are scaled after a softcap, bias or mask")
            (site.scale_tensors if _is_tensor(event.factor) else site.scale).append(event.term)
            continue
        if isinstance(event, Softcap):
            if stage > 0:
                raise NotFusable("softcap after a bias or mask")
            site.softcap, stage = event.cap, 1
            continue
        if len(shape(layout)) > 4:
            raise NotFusable("scores with more than two batch dims")
        if shape(site.batch_view) != shape(layout):
            _relayout_bias(site, event, layout)
        stage = 2
        operand = event.tensor if isinstance(event, Bias) else event.cond
        if operand in writes_between(event.node, site.pv):
            raise NotFusable(f"{operand.name} is modified in place after the scores read it")
        if isinstance(event, Bias):
            _add_bias(site, event.tensor, event.node, shape(layout), other_biases=other_biases)
        else:
            _add_fill(site, event.cond, event.hidden_where_true, event.value, shape(layout))


def _is_tensor(factor) -> bool:
    """A scale factor that is a one-element tensor node (known at run time), not a number."""
    return isinstance(factor, fx.Node) and isinstance(val(factor), torch.Tensor)


def _scales_first(events: list[ScoreEvent]) -> list[ScoreEvent]:
    """Move a positive constant scale that follows biases or fills ahead of them: ``(s + b)·c =
    s·c + b·c`` and ``fill(s, v)·c = fill(s·c, v·c)`` for ``c > 0`` (a negative ``c`` would turn
    -inf into +inf; a softcap in between does not commute). The bias becomes a ``b·c`` node and
    the fill value ``v·c`` as eager rounds it."""
    out: list[ScoreEvent] = []
    for event in events:
        masked = [n for n, e in enumerate(out) if isinstance(e, (Bias, Fill))]
        factor = event.factor if isinstance(event, Scale) else None
        c = python_scalar(factor)
        tensor = _is_tensor(factor)
        movable = (c is not None and c > 0) or (tensor and all(isinstance(out[n], Bias) for n in masked))
        if not masked or not movable or any(isinstance(e, Softcap) for e in out):
            out.append(event)
            continue
        c = factor if tensor else c  # a one-element tensor of unknown sign scales biases only
        for n in masked:
            e = out[n]
            if isinstance(e, Bias):
                out[n] = replace(e, tensor=_scaled_node(e.tensor, c, event.power, e.node))
            else:
                scaled = e.value * c if event.power == 1 else e.value / c
                out[n] = replace(e, value=round_to(scaled, dtype(e.node)))
        out.insert(masked[0], event)
    return out


def _scaled_node(t: fx.Node, c, power: int, before: fx.Node) -> fx.Node:
    """``t·c`` or ``t / c`` as a node with its ``val``, before ``before`` (or right after ``c``):
    ``c`` a number (as ``t·(1/c)``, so a scaled mask stays liftable: ``mask_lifting`` reads a mask
    times a number) or a one-element tensor node (made 0-d: no type promotion)."""
    if not isinstance(c, fx.Node):
        return insert_with_val(before, aten.mul.Tensor, (t, c if power == 1 else 1.0 / c))
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    before = c.next if order[c] > order[before] else before  # c may be computed after the bias's add
    factor = insert_with_val(before, aten.reshape.default, (c, []))
    return insert_with_val(before, aten.mul.Tensor if power == 1 else aten.div.Tensor, (t, factor))


def _finite_fills_as_biases(site: Site, events: list[ScoreEvent]) -> list[ScoreEvent]:
    """A finite fill followed by a bias (GPT-Neo: ``where(causal, s, finfo.min) + mask``) as
    one more bias: ``where(c, s, v) + b == s + (where(c, 0, v) + b)`` in float32/bfloat16 when v
    absorbs any score (v <= -1e30: s + v == v). Where c hides, both give v + b, so a 0/v mask
    adding v there gives -inf in both (v + v overflows) and a row hidden everywhere averages the
    keys that hold v, as eager does. The op replaces by its fill after adding its biases, so a
    finite fill before a bias can only be passed as a bias; a bias before it would then be added
    where eager replaced it, so that stays unfused."""
    last_bias = max((i for i, e in enumerate(events) if isinstance(e, Bias)), default=-1)
    folded: list[ScoreEvent] = []
    for i, event in enumerate(events):
        if not isinstance(event, Fill) or i > last_bias or event.value == float("-inf"):
            folded.append(event)
            continue
        scores_dtype = dtype(event.node)
        if event.value > _ABSORBING or scores_dtype not in (torch.float32, torch.bfloat16):
            raise NotFusable("a bias is added after the scores were filled with a finite value")
        if any(isinstance(e, Bias) for e in events[:i]):
            raise NotFusable("biases are added both before and after a finite fill of the scores")
        if dtype(event.cond) != torch.bool:
            raise NotFusable("masked_fill/where with a non-bool condition")
        if event.cond in writes_between(event.node, site.pv):
            raise NotFusable(f"{event.cond.name} is modified in place after the scores read it")
        bias = _fill_as_bias(event.cond, event.hidden_where_true, event.value, scores_dtype, event.node)
        folded.append(Bias(bias, event.node))
    return folded


def _fill_as_bias(cond: fx.Node, hidden_where_true: bool, value: float, scores_dtype, before: fx.Node) -> fx.Node:
    """``where(cond, value, 0)`` (or ``where(cond, 0, value)``) in the scores' dtype, with its ``val``."""
    values = (value, 0.0) if hidden_where_true else (0.0, value)
    bias = insert_with_val(before, aten.where.Scalar, (cond, *values))
    if scores_dtype != torch.float32:
        bias = insert_with_val(before, aten._to_copy.default, (bias,), {"dtype": scores_dtype})
    return bias


def _mask_layout(qk: fx.Node, events: list[ScoreEvent]) -> Optional[fx.Node]:
    """The scores' layout the op adopts: where masks apply, the one with the most batch dims."""
    layout, best = qk, None
    for event in events:
        if isinstance(event, View):
            layout = event.node
        elif isinstance(event, (Bias, Fill)) and (best is None or len(shape(layout)) >= len(shape(best))):
            best = layout
    return best


def _relayout_bias(site: Site, event: ScoreEvent, layout: fx.Node) -> None:
    """A bias added at another batch layout (``[B*H, ...]`` vs ``[B, H, ...]``) is reshaped to
    the op's, which is exact when it spans its layout's batch dims (no broadcasting there)."""
    have, want = tuple(shape(layout)[:-2]), tuple(shape(site.batch_view)[:-2])
    if not isinstance(event, Bias) or tuple(shape(event.tensor)[:-2]) != have or math.prod(have) != math.prod(want):
        raise NotFusable("masks are applied at two different batch layouts of the scores")
    site.relayout.add(event.tensor)


def _set_fill(site: Site, value: float, added: bool) -> None:
    """Record the fill, and whether it is added to the hidden scores (eager's additive mask:
    gradient and NaN flow through them) rather than written over them (``masked_fill``). One
    mask of each kind: written over, as the op cannot do both."""
    if site.fill is not None and site.fill != value:
        raise NotFusable(f"two masks fill with different values ({site.fill} and {value})")
    site.fill = value
    site.fill_added = added if site.fill_added is None else site.fill_added and added


def _add_band(site: Site, visible) -> bool:
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


def _lift_band(site: Site, hidden_set, dense: tuple, hidden_is_complement: bool, value: float, scores_shape,
               added: bool) -> bool:
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
    _set_fill(site, float(value), added)
    site.masks.extend((_aligned(site, d, scores_shape), False) for d in dense)
    return True


def _add_bias(site: Site, bias: fx.Node, add_node: fx.Node, scores_shape: tuple, other_biases: int) -> None:
    """An additive tensor: a lifted band when it only hides keys, a dense bias otherwise.

    ``s + v`` equals the op's "replace by v" when v is -inf, or a finite v so negative that it
    absorbs the score — and no other bias is added (``s + v + b`` is not ``v``, and two
    finfo.min terms overflow to -inf where both apply).
    """
    lifted, _ = lift_hidden_set(bias, scores_shape, site.mutated)
    if lifted is not None and lifted.inside == lifted.outside == 0 and not lifted.dense:
        return  # adding zeros (T5's cross-attention position_bias) changes nothing
    if lifted is not None and 0 in (lifted.inside, lifted.outside) and lifted.inside != lifted.outside:
        value = round_to(lifted.outside if lifted.inside == 0 else lifted.inside, dtype(add_node))
        absorbing = value == float("-inf") or (
            value <= _ABSORBING and dtype(add_node) in (torch.float32, torch.bfloat16) and not other_biases
        )
        # value sits outside (where ∧ dense) when inside == 0: hidden is the complement
        if absorbing and _lift_band(site, lifted.where, lifted.dense, lifted.inside == 0, value, scores_shape,
                                    added=True):
            return
    if not dtype(bias) or not dtype(bias).is_floating_point:
        raise NotFusable(f"a non-float tensor ({bias.name}) is added to the scores")
    aligned = _aligned(site, bias, scores_shape)
    term = _alibi_term(site, bias, scores_shape, dtype(add_node))
    if term is not None:
        site.alibi.append(term)
        return
    site.biases.append(aligned)


def _alibi_term(site: Site, bias: fx.Node, scores_shape: tuple, scores_dtype) -> Optional[AlibiTerm]:
    """``bias`` as ALiBi slopes (``mask_lifting.lift_slope``), or None to keep it dense. A bias
    computed coarser than the scores (float32 slopes in a float64 program) stays dense: eager adds
    its rounding, which the op, computing the bias afresh, would not reproduce."""
    slope, _ = lift_slope(bias, scores_shape, site.mutated)
    if slope is None:
        return None
    if slope.dtype is not None and scores_dtype is not None and \
            torch.finfo(slope.dtype).eps > torch.finfo(scores_dtype).eps:
        return None
    terms = dict(slope.index.terms)
    along_keys = terms.get(-1, 0)
    lead = tuple(shape(bias)[:-2])
    if slope.factor is not None:
        f_numel = math.prod(shape(slope.factor))
        if not (statically_known_true(f_numel == 1) or statically_known_true(f_numel == math.prod(lead))):
            return None  # slopes that cannot be laid out as the bias's batch dims without guessing
    exact = terms.get(-2, 0) == -along_keys and slope.index.const == Offset(0)
    if slope.absolute:  # |a·(j − i)| = |a|·|j − i|; any other magnitude stays dense
        return AlibiTerm(bias, slope.factor, slope.coef * abs(along_keys), exact, absolute=True) if exact else None
    return AlibiTerm(bias, slope.factor, slope.coef * along_keys, exact)


def settle_alibi(site: Site) -> None:
    """Keep a slope bias that differs from ``slope · (j − i)`` by a per-row constant (``slope · j``)
    only where softmax cannot see that constant: no sink reads the log-sum-exp, and hidden keys
    are replaced by -inf or a value no score comes near (a finite fill like -5 gets a weight
    relative to the row's scores). Otherwise the bias stays dense."""
    fill_blind = site.fill is None or site.fill == float("-inf") or site.fill <= _ABSORBING
    sign = _distance_sign(site)
    kept = []
    for term in site.alibi:
        if term.absolute and sign is not None:  # |j − i| = ±(j − i) on every visible key
            kept.append(replace(term, scale=term.scale * sign, absolute=False))
        elif term.absolute or (not term.exact and (site.sink is not None or not fill_blind)):
            site.biases.append(term.bias)
        else:
            kept.append(term)
    site.alibi = kept


def _distance_sign(site: Site) -> Optional[int]:
    """The sign of ``j − i`` on every key the band lets a query see (causal: -1), or None."""
    if site.band_hi is not None and site.band_hi.is_static and site.band_hi.const <= 0:
        return -1
    if site.band_lo is not None and site.band_lo.is_static and site.band_lo.const >= 0:
        return 1
    return None


def _add_fill(site: Site, cond: fx.Node, hidden_where_true: bool, value: float, scores_shape: tuple) -> None:
    if dtype(cond) != torch.bool:
        raise NotFusable("masked_fill/where with a non-bool condition")
    while is_op(cond, aten.bitwise_not, aten.logical_not) and cond.args[0] not in site.mutated:
        cond, hidden_where_true = cond.args[0], not hidden_where_true  # masked_fill(~visible, v)
    lifted, _ = lift_hidden_set(cond, scores_shape, site.mutated)
    if lifted is not None and isinstance(lifted.inside, bool) and lifted.inside != lifted.outside:
        # cond is True on (where ∧ dense) if inside is True, else on its complement
        cond_is_set = lifted.inside
        if _lift_band(site, lifted.where, lifted.dense, cond_is_set != hidden_where_true, value, scores_shape,
                      added=False):
            return
    _set_fill(site, value, added=False)
    site.masks.append((_aligned(site, cond, scores_shape), hidden_where_true))


def _aligned(site: Site, tensor: fx.Node, scores_shape: tuple) -> fx.Node:
    """``tensor`` itself, after checking it broadcasts to the scores without re-tiling."""
    t_shape = shape(tensor)
    if t_shape is None or len(t_shape) > len(scores_shape):
        raise NotFusable(f"{tensor.name} does not broadcast to the scores")
    for d, s in zip(reversed(t_shape), reversed(scores_shape)):
        if d != 1 and d != s:
            raise NotFusable(f"{tensor.name} of shape {tuple(t_shape)} does not broadcast to the scores {tuple(scores_shape)}")
    return tensor
