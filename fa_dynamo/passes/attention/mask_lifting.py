"""Mask lifting: recover the structure of a mask built inside the graph.

A mask computed from ``arange``/``full``/``ones``, comparisons, ``triu``/``tril`` and boolean
algebra is a function of the query index ``i`` (dim -2) and the key index ``j`` (dim -1) alone.
This module interprets such a subgraph abstractly and, when the visible keys form a band
``lo <= j - i <= hi``, returns that band; the Sq×Sk tensor then never needs to exist.

Abstract values:

* ``Affine``: an integer index tensor ``sum(coef[p] * index_along_dim(p)) + const``, with
  dims ``p`` counted from the end (-1 is the key axis, -2 the query axis once the mask lines
  up with the scores).
* ``Select``: a tensor equal to ``inside`` where ``lo <= j - i <= hi`` (or its complement) and
  every ``dense`` factor is True, ``outside`` elsewhere. Comparisons give
  ``Select(.., True, False)``; ``triu(full(v))`` gives ``Select(j - i >= d, v, 0)``. A boolean
  term ANDed in that depends on data (transformers' key padding, ``attention_mask[b, j]``)
  stays a dense factor: the band is lifted and only the small padding term reaches the op.
  A comparison of packed-sequence positions ANDed with the equality of their sequence ids is
  a comparison of indices (``mask_segments.resolve_packed_positions``); the equality itself stays a
  dense factor, which ``mask_segments.lift_segments`` reads as segment ids.

* ``Slope``: an index value times a tensor constant along the query and key axes (ALiBi:
  ``slopes[:, None, None] * (j - i)``, MPT's ``arange(1 - S, 1) * slopes``); ``lift_slope``
  returns it for an additive bias, which then reaches the op as per-head slopes
  (``kernels/alibi.py``) instead of an Sq×Sk tensor.

Offsets may be symbolic (``Offset`` keeps SymInt nodes), so a causal mask with a dynamic
past length still lifts. Anything else makes ``lift`` return None: the caller passes the mask
on as a dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo.passes.attention.mask_segments import resolve_packed_positions
from fa_dynamo.passes.matching import aten, is_op, normalize_dim, round_to, shape, val


_CONSTANTS = (aten.full, aten.ones, aten.zeros, aten.scalar_tensor, aten.new_full, aten.new_ones, aten.new_zeros)
_AND = (aten.bitwise_and, aten.logical_and, aten.__and__)
_OR = (aten.bitwise_or, aten.logical_or, aten.__or__)


@dataclass(frozen=True)
class Offset:
    """An integer ``const + sum(coef * symint_node)``."""

    const: int = 0
    syms: tuple = ()  # ((node, coef), ...)

    @staticmethod
    def of(arg: Any) -> Optional["Offset"]:
        if isinstance(arg, bool):
            return None
        if isinstance(arg, int):
            return Offset(arg)
        if isinstance(arg, fx.Node) and isinstance(val(arg), torch.SymInt):
            return Offset(0, ((arg, 1),))
        return None

    def __add__(self, other: "Offset") -> "Offset":
        coefs: dict = dict(self.syms)
        for n, c in other.syms:
            coefs[n] = coefs.get(n, 0) + c
        return Offset(self.const + other.const, tuple((n, c) for n, c in coefs.items() if c))

    def __neg__(self) -> "Offset":
        return Offset(-self.const, tuple((n, -c) for n, c in self.syms))

    def __sub__(self, other: "Offset") -> "Offset":
        return self + (-other)

    def scaled(self, k: int) -> "Offset":
        return Offset(self.const * k, tuple((n, c * k) for n, c in self.syms))

    @property
    def is_static(self) -> bool:
        return not self.syms

    def emit(self, graph: fx.Graph) -> Union[int, fx.Node]:
        """The offset as a graph value (an int, or SymInt arithmetic nodes before the cursor)."""
        import operator

        result: Union[int, fx.Node] = self.const
        for n, c in self.syms:
            term = n if c == 1 else graph.call_function(operator.mul, (n, c))
            result = term if result == 0 and not isinstance(result, fx.Node) else graph.call_function(operator.add, (result, term))
        return result


@dataclass(frozen=True)
class Affine:
    terms: tuple  # ((pos_from_end, coef), ...)
    const: Offset
    rank: int
    extents: tuple = ()  # ((pos_from_end, length of the arange along it), ...)


@dataclass(frozen=True)
class Slope:
    """``coef · factor · index``: ``factor`` is a tensor of size 1 on the query and key axes
    (per batch or head), or None for a plain number."""

    index: Affine
    factor: Optional[fx.Node]
    coef: float
    rank: int
    dtype: Optional[torch.dtype] = None  # what the product was computed in (None: a Python number)
    absolute: bool = False  # the magnitude ``|index|`` (encoder ALiBi's ``|i - j|``)


@dataclass(frozen=True)
class Interval:
    """``lo <= j - i <= hi`` (None = unbounded), or its complement if ``complement``."""

    lo: Optional[Offset] = None
    hi: Optional[Offset] = None
    complement: bool = False

    def invert(self) -> "Interval":
        """The complement; a half-line's complement is the other half-line, not a flag."""
        if self.complement:
            return replace(self, complement=False)
        if self.lo is not None and self.hi is None:
            return Interval(hi=self.lo - Offset(1))
        if self.hi is not None and self.lo is None:
            return Interval(lo=self.hi + Offset(1))
        return replace(self, complement=True)

    def shifted(self, delta: Offset) -> "Interval":
        return Interval(
            None if self.lo is None else self.lo + delta, None if self.hi is None else self.hi + delta, self.complement
        )


def _tighter(a: Optional[Offset], b: Optional[Offset], pick) -> Optional[Offset]:
    if a is None or b is None:
        return a if b is None else b
    if a == b:
        return a
    if a.is_static and b.is_static:
        return Offset(pick(a.const, b.const))
    raise _NotLiftable("two symbolic bounds on one side of the band")


def _intersect(a: Interval, b: Interval) -> Interval:
    if a.complement or b.complement:
        raise _NotLiftable("intersection with the complement of a band")
    return Interval(_tighter(a.lo, b.lo, max), _tighter(a.hi, b.hi, min))


@dataclass(frozen=True)
class Select:
    where: Interval
    inside: Any
    outside: Any
    rank: int = 2
    dense: tuple = ()  # bool nodes ANDed into ``where`` (key padding and other data-dependent terms)


class _NotLiftable(Exception):
    pass


@dataclass
class _Interpreter:
    mutated: frozenset = frozenset()
    memo: dict = field(default_factory=dict)

    def value(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            if isinstance(arg, (bool, int, float)):
                return arg
            raise _NotLiftable(f"argument {arg!r}")
        if arg in self.mutated:
            raise _NotLiftable(f"{arg.name} is modified in place")
        if arg not in self.memo:
            value = self._eval(arg)
            _check_extent(arg, value)
            self.memo[arg] = value
        return self.memo[arg]

    def spanning(self, arg: Any, out: fx.Node) -> Any:
        """``value(arg)`` used to compute ``out``: a mask over ``j - i`` may not be broadcast
        from a size-1 row or column (it would then no longer depend on that index)."""
        x = self.value(arg)
        if isinstance(x, Select) and (x.where != Interval() or x.dense) and isinstance(arg, fx.Node):
            if tuple(shape(arg)[-2:]) != tuple(shape(out)[-2:]):
                raise _NotLiftable("a mask row or column broadcast across the query/key dims")
        return x

    def _eval(self, n: fx.Node) -> Any:
        if isinstance(val(n), torch.SymInt):
            return Offset.of(n)
        if is_op(n, aten.arange):
            return self._arange(n)
        if is_op(n, *_CONSTANTS):
            packet = n.target.overloadpacket
            fill = {aten.ones: 1, aten.zeros: 0, aten.new_ones: 1, aten.new_zeros: 0}.get(packet)
            if fill is None:
                fill = n.args[{aten.scalar_tensor: 0, aten.full: 1, aten.new_full: 2}[packet]]
            if val(n).dtype == torch.bool:
                fill = bool(fill)
            elif val(n).dtype.is_floating_point:
                fill = round_to(float(fill), val(n).dtype)
            return Select(Interval(), fill, fill, len(shape(n)))
        if is_op(n, aten.triu, aten.tril):
            return self._triangle(n)
        if is_op(n, aten.unsqueeze):
            return self._unsqueeze(self.value(n.args[0]), n.args[1])
        if is_op(n, aten.expand, aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.contiguous):
            return self._reshape(n)
        if is_op(n, aten.to, aten._to_copy, aten.type_as):
            return self._cast(self.value(n.args[0]), val(n).dtype)
        if is_op(n, aten.slice):
            return self._slice(n)
        if is_op(n, aten.add, aten.sub):
            return self._add(n)
        if is_op(n, aten.mul):
            return self._mul(n)
        if is_op(n, aten.neg):
            return self._scaled(self.value(n.args[0]), -1)
        if is_op(n, aten.squeeze):
            return self._squeeze(n)
        if is_op(n, aten.abs):
            return self._abs(self.value(n.args[0]))
        if is_op(n, aten.le, aten.lt, aten.ge, aten.gt, aten.eq, aten.ne):
            return self._compare(n)
        if is_op(n, aten.bitwise_not, aten.logical_not):
            return self._not(self.value(n.args[0]))
        if is_op(n, *_AND, *_OR):
            return self._logic(n)
        if is_op(n, aten.where):
            return self._where(n)
        if is_op(n, aten.masked_fill):
            return self._masked_fill(n)
        raise _NotLiftable(f"{n.target} is not understood by the mask lifter")

    # --- index arithmetic -------------------------------------------------------------------
    def _arange(self, n: fx.Node) -> Affine:
        args = list(n.args)
        if n.target == aten.arange.default:
            start, step = 0, 1
        else:
            start, step = args[0], args[2] if len(args) > 2 else n.kwargs.get("step", 1)
        start_off = Offset.of(start)
        if step != 1 or start_off is None:
            raise _NotLiftable("arange with a step or a non-integer start")
        return Affine(((-1, 1),), start_off, 1, ((-1, shape(n)[0]),))

    def _unsqueeze(self, x: Any, dim: int) -> Any:
        if isinstance(x, Slope):
            if normalize_dim(dim, x.rank + 1) > x.rank - 2:
                raise _NotLiftable("unsqueeze moves the query/key axes of a position bias")
            return replace(x, rank=x.rank + 1)
        if isinstance(x, Select):
            d = normalize_dim(dim, x.rank + 1)
            if d >= x.rank - 1 and (x.where != Interval() or x.dense):
                raise _NotLiftable("unsqueeze moves the query/key axes of a mask")
            if x.dense and d != 0:
                raise _NotLiftable("unsqueeze inside a mask with a data-dependent term")
            return replace(x, rank=x.rank + 1)
        if not isinstance(x, Affine):
            raise _NotLiftable("unsqueeze of a non-index value")
        new_rank = x.rank + 1
        d = normalize_dim(dim, new_rank)
        move = lambda p: p if x.rank + p >= d else p - 1  # noqa: E731
        terms = tuple((move(p), c) for p, c in x.terms)
        return Affine(terms, x.const, new_rank, tuple((move(p), n) for p, n in x.extents))

    def _reshape(self, n: fx.Node) -> Any:
        x = self.spanning(n.args[0], n) if is_op(n, aten.expand) else self.value(n.args[0])
        if is_op(n, aten.clone, aten.contiguous):
            return x
        before, after = shape(n.args[0]), shape(n)
        strip = lambda s: tuple(s)[next((i for i, d in enumerate(s) if d != 1), len(s)):]  # noqa: E731
        if not is_op(n, aten.expand) and strip(before) != strip(after):
            raise _NotLiftable("a reshape that moves the query/key axes")
        if not is_op(n, aten.expand) and getattr(x, "dense", ()) and tuple(before) != tuple(after)[-len(before):]:
            raise _NotLiftable("a reshape of a mask with a data-dependent term")
        if is_op(n, aten.expand) and tuple(after[len(after) - len(before):]) != tuple(before):
            if isinstance(x, Affine):
                raise _NotLiftable("an index broadcast by expand")
        return replace(x, rank=len(after))

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, Select):
            if dtype == torch.bool:
                conv = bool
            elif dtype.is_floating_point:
                conv = lambda v: round_to(float(v), dtype)  # noqa: E731  (finfo(f32).min → bf16 is -inf)
            else:
                conv = int
            return replace(x, inside=conv(x.inside), outside=conv(x.outside))
        return x

    def _slice(self, n: fx.Node) -> Any:
        x = self.value(n.args[0])
        dim = n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        start_off = Offset.of(start if start is not None else 0)
        size = shape(n.args[0])[dim]
        if start_off is not None and start_off.is_static and start_off.const < 0 and isinstance(size, int):
            start_off = Offset(max(0, start_off.const + size))  # x[-n:] counts from the end
        if step != 1 or start_off is None or (start_off.is_static and start_off.const < 0):
            raise _NotLiftable("a slice with a step or a negative start")
        rank = x.rank
        pos = normalize_dim(dim, rank) - rank
        if getattr(x, "dense", ()):
            raise _NotLiftable("a slice of a mask with a data-dependent term")
        if isinstance(x, (Affine, Slope)):  # index values start + k along the sliced dim, k < its new length
            index = x if isinstance(x, Affine) else x.index
            coef = dict(index.terms).get(pos, 0)
            extents = tuple((p, shape(n)[p] if p == pos else length) for p, length in index.extents)
            index = replace(index, const=index.const + start_off.scaled(coef), extents=extents)
            return index if isinstance(x, Affine) else replace(x, index=index)
        if pos == -2:  # rows i_new = i - start: j - i_new = (j - i) + start
            return replace(x, where=x.where.shifted(start_off))
        if pos == -1:
            return replace(x, where=x.where.shifted(-start_off))
        return x

    def _add(self, n: fx.Node) -> Affine:
        a, b = self.value(n.args[0]), self.value(n.args[1])
        alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
        sign = -alpha if is_op(n, aten.sub) else alpha
        a, b = self._affine(a), self._affine(b)
        if a is None or b is None or not isinstance(sign, int):
            raise _NotLiftable("arithmetic on non-index values")
        coefs: dict = dict(a.terms)
        for p, c in b.terms:
            coefs[p] = coefs.get(p, 0) + sign * c
        return Affine(tuple((p, c) for p, c in coefs.items() if c), a.const + b.const.scaled(sign),
                      max(a.rank, b.rank), a.extents + b.extents)

    def _mul(self, n: fx.Node) -> Union[Affine, Slope, Select]:
        """An index times an integer stays an index; times a float or a tensor constant along
        the query and key axes it is a ``Slope``. A mask times a number scales its two values."""
        a, b = (self._operand(arg) for arg in n.args[:2])
        if isinstance(b, Select):
            a, b = b, a
        if isinstance(a, Select) and _number(b) and _number(a.inside) and _number(a.outside):
            scaled = (round_to(x * b, val(n).dtype) if val(n).dtype.is_floating_point else x * b
                      for x in (a.inside, a.outside))
            return replace(a, inside=next(scaled), outside=next(scaled), rank=len(shape(n)))  # a mask times a number
        if not isinstance(a, (Affine, Slope)):
            a, b = b, a
        if not isinstance(a, (Affine, Slope)) or isinstance(b, (Affine, Slope)):
            raise _NotLiftable("a product that is not an index times a constant")
        if isinstance(b, fx.Node):
            if not _constant_on_last_two(b, n):
                raise _NotLiftable("a product with a tensor that varies along the query/key axes")
            if isinstance(a, Slope) and a.factor is not None:
                raise _NotLiftable("a position bias with two tensor factors")
            slope = Slope(a, None, 1.0, a.rank) if isinstance(a, Affine) else a
            return replace(slope, factor=b, rank=len(shape(n)), dtype=val(n).dtype)
        scaled = self._scaled(a, b)
        return replace(scaled, dtype=val(n).dtype) if isinstance(scaled, Slope) else scaled

    def _operand(self, arg: Any) -> Any:
        """``value(arg)``, or the node itself when the lifter cannot read it (a slopes tensor)."""
        try:
            x = self.value(arg)
        except _NotLiftable:
            if isinstance(arg, fx.Node) and arg not in self.mutated and isinstance(val(arg), torch.Tensor):
                return arg
            raise
        if isinstance(x, Select) and x.inside == x.outside and not x.dense:
            return x.inside  # a constant tensor: its value
        return x

    @staticmethod
    def _scaled(x: Any, k: Any) -> Union[Affine, Slope]:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise _NotLiftable("an index scaled by a non-constant")
        if isinstance(x, Slope):
            return replace(x, coef=x.coef * k)
        if not isinstance(x, Affine):
            raise _NotLiftable("a product of non-index values")
        if isinstance(k, int):
            return replace(x, terms=tuple((p, c * k) for p, c in x.terms), const=x.const.scaled(k))
        return Slope(x, None, float(k), x.rank)

    @staticmethod
    def _abs(x: Any) -> Slope:
        """``|index|``: a slope whose sign ``score_chain.settle_alibi`` resolves from the band."""
        if not isinstance(x, Affine):
            raise _NotLiftable("abs of a non-index value")
        return Slope(x, None, 1.0, x.rank, absolute=True)

    def _squeeze(self, n: fx.Node) -> Any:
        """Dropping size-1 leading dims of an index or position bias."""
        x = self.value(n.args[0])
        before = shape(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else [d for d, size in enumerate(before) if size == 1]
        dims = [normalize_dim(d, len(before)) for d in ([dims] if isinstance(dims, int) else dims)]
        dropped = [d for d in dims if before[d] == 1]
        if not isinstance(x, (Affine, Slope)) or any(d >= len(before) - 2 for d in dropped):
            raise _NotLiftable("a squeeze of the query/key axes or of a mask")
        return replace(x, rank=x.rank - len(dropped))

    @staticmethod
    def _affine(x: Any) -> Optional[Affine]:
        if isinstance(x, Affine):
            return x
        off = x if isinstance(x, Offset) else Offset.of(x)
        return None if off is None else Affine((), off, 0)

    # --- comparisons and boolean algebra ------------------------------------------------------
    def _compare(self, n: fx.Node) -> Select:
        a, b = self.spanning(n.args[0], n), self.value(n.args[1])
        op = n.target.overloadpacket
        if isinstance(a, Select) and op in (aten.eq, aten.ne):
            return self._compare_select(a, b, op)
        return self._compare_indices(n, a, b, op)

    def _plus(self, x: Any, shift: int) -> Any:
        """An index value plus an integer (unchanged for 0; not an index value: left to fail)."""
        affine = self._affine(x) if shift else None
        return x if affine is None else replace(affine, const=affine.const + Offset(shift))

    def _compare_indices(self, n: fx.Node, a: Any, b: Any, op) -> Select:
        """``a OP b`` for index values ``a`` and ``b``; ``n`` is the comparison's node."""
        a, b = self._affine(a), self._affine(b)
        if a is None or b is None:
            raise _NotLiftable("comparison of non-index values")
        coefs: dict = dict(a.terms)
        for p, c in b.terms:
            coefs[p] = coefs.get(p, 0) - c
        coefs = {p: c for p, c in coefs.items() if c}
        const = a.const - b.const  # the comparison is: sum(coefs) + const  OP  0
        if len(coefs) == 1 and const.is_static:
            return self._compare_one_index(n, a, b, coefs, const.const, op)
        if set(coefs) != {-1, -2} or coefs[-1] != -coefs[-2] or abs(coefs[-1]) != 1:
            raise _NotLiftable("a comparison that is not of the form (j - i) vs offset")
        if coefs[-1] == -1:  # -(j - i) + c OP 0  <=>  (j - i) - c  OP'  0
            const = -const
            op = {aten.le: aten.ge, aten.lt: aten.gt, aten.ge: aten.le, aten.gt: aten.lt}.get(op, op)
        bound = -const  # (j - i) OP bound
        one = Offset(1)
        interval = {
            aten.le: Interval(hi=bound),
            aten.lt: Interval(hi=bound - one),
            aten.ge: Interval(lo=bound),
            aten.gt: Interval(lo=bound + one),
            aten.eq: Interval(lo=bound, hi=bound),
            aten.ne: Interval(lo=bound, hi=bound, complement=True),
        }[op]
        return Select(interval, True, False, max(a.rank, b.rank))

    def _compare_one_index(self, n: fx.Node, a: Affine, b: Affine, coefs: dict, const: int, op) -> Select:
        """``coef * index + const OP 0`` over one axis: constant when it holds (or fails) for
        every index of the arange (transformers' bidirectional ``q_idx >= 0``)."""
        (pos, coef), = coefs.items()
        extents = dict(a.extents + b.extents)
        if pos not in extents:
            raise _NotLiftable("a comparison of an index of unknown extent")
        ends = (const, coef * (extents[pos] - 1) + const)
        test = {aten.le: lambda x: x <= 0, aten.lt: lambda x: x < 0, aten.ge: lambda x: x >= 0,
                aten.gt: lambda x: x > 0, aten.eq: lambda x: x == 0, aten.ne: lambda x: x != 0}[op]
        lo, hi = min(ends), max(ends)
        if op in (aten.eq, aten.ne) and lo != hi:
            raise _NotLiftable("a comparison that depends on one index")
        if test(lo) != test(hi):
            raise _NotLiftable("a comparison that depends on one index")
        return Select(Interval(), test(lo), test(lo), len(shape(n)))

    def _compare_select(self, a: Select, b: Any, op) -> Select:
        if not isinstance(b, (int, float, bool)) or a.inside == a.outside or a.dense:
            raise _NotLiftable("comparison of a mask with a tensor")
        if a.inside == b:
            where = a.where
        elif a.outside == b:
            where = a.where.invert()
        else:
            raise _NotLiftable("comparison that is constant")
        return Select(where if op is aten.eq else where.invert(), True, False, a.rank)

    @staticmethod
    def _as_bool(x: Any) -> tuple[Interval, tuple]:
        """A boolean value as ``(interval, dense factors)``: True on ``interval ∧ all(dense)``."""
        if isinstance(x, Select) and x.inside is True and x.outside is False:
            return x.where, x.dense
        if isinstance(x, Select) and x.inside is False and x.outside is True and not x.dense:
            return x.where.invert(), ()
        if isinstance(x, Select) and x.inside == x.outside and isinstance(x.inside, bool) and not x.dense:
            return (Interval() if x.inside else Interval(complement=True)), ()
        raise _NotLiftable("boolean algebra on a non-boolean mask")

    def _as_set(self, x: Any) -> Interval:
        where, dense = self._as_bool(x)
        if dense:
            raise _NotLiftable("negation or union of a data-dependent mask term")
        return where

    def _not(self, x: Any) -> Select:
        return Select(self._as_set(x).invert(), True, False, x.rank)

    def _logic(self, n: fx.Node) -> Select:
        if is_op(n, *_OR):  # a | b = ~(~a & ~b)
            a, b = self.spanning(n.args[0], n), self.spanning(n.args[1], n)
            where = _intersect(self._as_set(a).invert(), self._as_set(b).invert()).invert()
            return Select(where, True, False, max(a.rank, b.rank))
        (wa, da), (wb, db) = (self._conjunct(arg, n) for arg in n.args[:2])
        where, dense = _intersect(wa, wb), da + db
        resolved, dense = resolve_packed_positions(dense)
        for comparison, column_a, column_b, shift_a, shift_b in resolved:
            try:
                indices = self._compare_indices(comparison, self._plus(self.value(column_a), shift_a),
                                                self._plus(self.value(column_b), shift_b),
                                                comparison.target.overloadpacket)
                where = _intersect(where, indices.where)
            except _NotLiftable:  # not a band over the indices: the comparison stays a dense term
                dense += (comparison,)
        return Select(where, True, False, len(shape(n)), dense)

    def _conjunct(self, arg: Any, out: fx.Node) -> tuple[Interval, tuple]:
        """One side of an AND; a boolean term the lifter cannot read stays as a dense factor."""
        try:
            return self._as_bool(self.spanning(arg, out))
        except _NotLiftable:  # read by the op, later: not if its storage is written in place anywhere
            if isinstance(arg, fx.Node) and isinstance(val(arg), torch.Tensor) and val(arg).dtype == torch.bool \
                    and arg not in self.mutated:
                return Interval(), (arg,)
            raise

    def _triangle(self, n: fx.Node) -> Select:
        x = self.value(n.args[0])
        diagonal = Offset.of(n.args[1] if len(n.args) > 1 else n.kwargs.get("diagonal", 0))
        if not isinstance(x, Select) or x.inside != x.outside or x.dense or diagonal is None:
            raise _NotLiftable("triu/tril of a non-constant tensor")
        zero = False if isinstance(x.inside, bool) else 0
        where = Interval(lo=diagonal) if is_op(n, aten.triu) else Interval(hi=diagonal)
        return Select(where, x.inside, zero, x.rank)

    def _where(self, n: fx.Node) -> Select:
        cond, dense = self._as_bool(self.spanning(n.args[0], n))
        a, b = self._constant(self.value(n.args[1])), self._constant(self.value(n.args[2]))
        return Select(cond, a, b, len(shape(n)), dense)

    def _masked_fill(self, n: fx.Node) -> Select:
        cond, dense = self._as_bool(self.spanning(n.args[1], n))
        base = self._constant(self.value(n.args[0]))
        return Select(cond, self._constant(self.value(n.args[2])), base, len(shape(n)), dense)

    @staticmethod
    def _constant(x: Any) -> Any:
        if isinstance(x, Select) and x.inside == x.outside:
            return x.inside
        if isinstance(x, (int, float, bool)):
            return x
        raise _NotLiftable("a value that is not constant")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _constant_on_last_two(factor: fx.Node, product: fx.Node) -> bool:
    """``factor`` broadcasts into ``product`` with size 1 along its query and key axes."""
    f_shape, p_shape = shape(factor), shape(product)
    return f_shape is not None and len(f_shape) <= len(p_shape) and all(d == 1 for d in tuple(f_shape)[-2:])


def _check_extent(node: fx.Node, value: Any) -> None:
    """``Affine`` terms are exact row/column indices only over the arange they came from."""
    node_shape = shape(node)
    if node_shape is None:
        return
    if isinstance(value, Slope):
        value = value.index
    if isinstance(value, Affine):
        for pos, length in value.extents:
            if len(node_shape) < -pos or node_shape[pos] != length:
                raise _NotLiftable("an index broadcast across the query/key dims")


def lift_hidden_set(
    mask_node: fx.Node, scores_shape: tuple, mutated: frozenset = frozenset()
) -> tuple[Optional[Select], str]:
    """Interpret ``mask_node`` abstractly; ``(Select, "")`` or ``(None, reason)``.

    The mask must line up with the scores: its last two dims equal the scores' (query, key)
    dims, so no broadcasting can re-tile it. Leading (batch, head) dims may be anything: a
    lifted value depends on ``j - i`` alone, so it is the same in every batch and head.
    """
    mshape = shape(mask_node)
    if mshape is None or len(mshape) < 2 or tuple(mshape[-2:]) != tuple(scores_shape[-2:]):
        return None, "the mask does not have the scores' query/key shape"
    return _interpret(mask_node, mutated, Select, "the mask is not a function of (query, key) indices")


def _interpret(node: fx.Node, mutated: frozenset, kind: type, not_kind: str) -> tuple[Any, str]:
    """``(value, "")`` when ``node`` interprets to a ``kind``, else ``(None, why not)``."""
    try:
        value = _Interpreter(mutated).value(node)
    except _NotLiftable as e:
        return None, str(e)
    return (value, "") if isinstance(value, kind) else (None, not_kind)


def lift_slope(bias_node: fx.Node, scores_shape: tuple, mutated: frozenset = frozenset()) -> tuple[Optional[Slope], str]:
    """Interpret an additive bias as a ``Slope`` over ``(i, j)``; ``(Slope, "")`` or ``(None, reason)``.

    The bias must span the scores' keys; along the queries it may be 1 (a per-key bias such as
    MPT's), and then it may not depend on the query index.
    """
    bshape = shape(bias_node)
    if bshape is None or len(bshape) < 2 or bshape[-1] != scores_shape[-1] or bshape[-2] not in (1, scores_shape[-2]):
        return None, "the bias does not have the scores' key length"
    value, why = _interpret(bias_node, mutated, Slope, "the bias is not a slope times (query, key) indices")
    if value is None:
        return None, why
    axes = {p for p, _ in value.index.terms}
    if not axes <= {-1, -2} or (bshape[-2] != scores_shape[-2] and -2 in axes):
        return None, "the bias is not a function of the query and key indices alone"
    return value, ""
