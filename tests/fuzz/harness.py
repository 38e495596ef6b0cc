"""Run one generated program: exec its source, compile it with the backend, compare with eager.

``check(source)`` is the whole property, shared by the hypothesis test, the regression replay
and the survey script:

* eager runs first; a program eager cannot run is a generator bug (``InvalidProgram``);
* the compiled function (``tests.conftest.Compiled``: strict mode, inner eager, the program's
  ``OPTIONS`` if any — tile sizes, kernel; dynamic when the program says so) must give the same
  outputs on every ``SHAPES`` entry: NaN exactly where eager has NaN, values within the dtype
  tolerances of ``assert_same_as_eager`` (those of the ``AUTOCAST`` dtype for a program that
  computes in it: its float32 gradients carry that precision), or, failing that, no further from a float64 run of the
  same program than 2x eager's own error (so that a fused kernel that is *more* accurate than a
  bfloat16 eager run is not a failure), where eager itself is within 50x its tolerance of the
  float64 run;
* with ``GRAD``, gradients of a fixed random projection of the outputs w.r.t. every float input
  likewise (3x for the float64 comparison), on shapes whose outputs have no NaN;
* with ``IS_ATTENTION and EXPECT_FUSED``, the op must have been used (``require_fusion``).
"""

from __future__ import annotations

import itertools
import linecache
from dataclasses import dataclass, field

import torch

from tests.conftest import Compiled

TOLERANCES = {  # (atol, rtol) against eager, as tests.conftest.assert_same_as_eager
    torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-8), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3),
}
FLOORS = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}

_names = itertools.count()


class Mismatch(AssertionError):
    """The compiled program's result differs from eager."""


class NotFused(AssertionError):
    """An attention program was left unfused."""


class InvalidProgram(Exception):
    """Eager cannot run the program: the generator wrote something invalid."""


@dataclass
class Outcome:
    fused: int
    refused: list = field(default_factory=list)  # (where, why)


def load(source: str) -> dict:
    """The program's module namespace (its source registered with linecache for tracebacks)."""
    filename = f"<fuzz-program-{next(_names)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "fuzz_program"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def check(source: str, require_fusion: bool = True) -> Outcome:
    ns = load(source)
    fn = ns["program"]
    compiled = Compiled(fn, options=ns.get("OPTIONS"), dynamic=True if ns["DYNAMIC"] else None)
    for index, shape in enumerate(ns["SHAPES"]):
        inputs = ns["make_inputs"](torch.Generator().manual_seed(index), **shape)
        try:
            expected = fn(*inputs)
        except Exception as e:  # noqa: BLE001
            raise InvalidProgram(f"eager raised {type(e).__name__}: {e}") from e
        actual = compiled(*inputs)
        precision = ns.get("AUTOCAST")
        # finfo constants give the float64 run another program (finfo(s.dtype).min is -1.8e308 there)
        exact64 = "torch.finfo(" not in source
        # under autocast, also float64 on the inputs as autocast rounds them (eager and the op both
        # read rounded q, k, v; eager also rounds its intermediates, the op does not)
        rounded = None if precision is None else _to_double(_rounded(inputs, precision))
        compare(actual, expected, [lambda: fn(*_to_double(inputs))] + ([lambda: fn(*rounded)] if rounded else []),
                f"output, shape {shape}", precision=precision, exact64=exact64)
        if ns["GRAD"] and not any(t.isnan().any() for t in _flat(expected)):
            ours, theirs = _grads(compiled, inputs), _grads(fn, inputs)
            compare(ours, theirs, [lambda: _grads(fn, _to_double(inputs))] + ([lambda: _grads(fn, rounded)] if rounded
                                                                               else []),
                    f"gradients, shape {shape}", factor=3.0, precision=precision, exact64=exact64)
    outcome = Outcome(compiled.fused, list(compiled.refused))
    if require_fusion and ns["IS_ATTENTION"] and ns["EXPECT_FUSED"] and outcome.fused == 0:
        raise NotFused(f"attention left unfused; refused: {outcome.refused}")
    return outcome


def compare(actual, expected, references, what: str, factor: float = 2.0, precision=None, exact64: bool = False) -> None:
    """``actual`` equals ``expected`` (eager), or one of the ``references`` (callables giving float64
    runs, tried lazily in turn) judges it no further from itself than ``factor`` times eager.
    ``precision``: a coarser dtype the values were computed in (autocast), for the tolerances.
    ``exact64``: the float64 run is the same program (no dtype-dependent constants), so it is the
    judge even where eager's own rounding took it far away (bfloat16 ``s + -10000`` keeps no
    digit of ``s``)."""
    actual, expected = _flat(actual), _flat(expected)
    if len(actual) != len(expected):
        raise Mismatch(f"{what}: {len(actual)} outputs, eager has {len(expected)}")
    refs = None
    for n, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        a = torch.zeros_like(e) if a is None else a
        e = torch.zeros_like(a) if e is None else e
        if a.shape != e.shape or a.dtype != e.dtype:
            raise Mismatch(f"{what} {n}: {tuple(a.shape)} {a.dtype}, eager {tuple(e.shape)} {e.dtype}")
        if not torch.equal(a.isnan(), e.isnan()):
            raise Mismatch(
                f"{what} {n}: NaN pattern differs: eager has {int(e.isnan().sum())} NaN, compiled "
                f"{int(a.isnan().sum())}, {int((a.isnan() != e.isnan()).sum())} positions differ"
            )
        if e.is_floating_point() is False or a.numel() == 0:
            if not torch.equal(a, e):
                raise Mismatch(f"{what} {n}: differs from eager")
            continue
        coarser = precision is not None and torch.finfo(precision).eps > torch.finfo(e.dtype).eps
        coarse = precision if coarser else e.dtype
        atol, rtol = TOLERANCES[coarse]
        if torch.allclose(a, e, atol=atol, rtol=rtol, equal_nan=True):
            continue
        if refs is None:
            try:
                refs = [_flat(reference()) for reference in references]
            except Exception as err:  # noqa: BLE001  (a program written for one dtype only)
                raise Mismatch(f"{what} {n}: differs from eager beyond tolerance; the float64 run failed: {err}")
        verdicts = [_judge(a, e, ref[n], atol, factor, FLOORS[coarse], exact64) for ref in refs]
        if all(v is not None for v in verdicts):
            diff = ((a.double() - e.double()).abs() * (a.isfinite() & e.isfinite())).nan_to_num().max().item()
            raise Mismatch(f"{what} {n}: max |compiled - eager| = {diff:.3g} (tolerance {atol:g} + {rtol:g}·|eager|); "
                           f"against float64: {verdicts[0]}")


def _judge(a, e, r, atol: float, factor: float, floor: float, exact64: bool):
    """None when the float64 run ``r`` finds the compiled ``a`` no further from it than ``factor``
    times eager's ``e`` (and the infinities where eager has them); else the two errors, as text."""
    r = r if r is not None else torch.zeros_like(e, dtype=torch.float64)
    finite = e.isfinite() & r.isfinite() & a.isfinite()
    err = ((a.double() - r).abs() * finite).nan_to_num().max().item()
    eager_err = ((e.double() - r).abs() * finite).nan_to_num().max().item()
    # otherwise the float64 run vouches for the compiled result only where it is close to eager (a
    # program whose meaning depends on its dtype — finfo(s.dtype).min — is not the same in float64)
    trusted = exact64 or eager_err <= 50 * atol
    if trusted and torch.equal(a.isinf(), e.isinf()) and err <= factor * eager_err + floor:
        return None
    return f"compiled {err:.3g}, eager {eager_err:.3g}"


def _rounded(inputs, dtype: torch.dtype) -> list:
    """Float inputs rounded to ``dtype`` (as autocast casts them at the matmuls), in their own dtype."""
    return [t.to(dtype).to(t.dtype) if t.is_floating_point() else t for t in inputs]


def _flat(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _to_double(inputs) -> list:
    return [t.double() if t.is_floating_point() else t for t in inputs]


def _grads(fn, inputs) -> list:
    """Gradients of a fixed random projection of ``fn``'s outputs w.r.t. every float input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = _flat(fn(*leaves))
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    floats = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, floats, allow_unused=True)
    return list(grads)
