"""Compiled ≡ eager on generated attention programs (and near-misses), plus the regressions.

The property (``tests.fuzz.harness.check``), for every generated program:

* compiled with the backend (``tests.conftest.Compiled``: strict mode, inner eager), the
  outputs equal eager's — NaN exactly where eager has NaN, values within the dtype
  tolerances (or no further from a float64 run than 2x eager's own error);
* gradients too, for programs that ask for them (``GRAD = True``);
* a program that is attention uses the op (``fused >= 1``), under ``torch.autocast`` too (with
  eager's dtypes), hand-written max/exp/sum softmaxes and ``aten._safe_softmax`` included;
* SDPA programs (``tests.fuzz.sdpa_programs``) likewise: every one is attention and must fuse,
  with SDPA's 0 for rows that see no key.

On failure hypothesis prints the shrunk program's source. Every failure found goes into
``tests/fuzz/regressions.py``, replayed here by a plain parametrized test.

Statistics (fused / refused and why) are reported as hypothesis events:
``python -m pytest tests/fuzz --hypothesis-show-statistics``.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings

from tests.fuzz import harness
from tests.fuzz.programs import Program, programs
from tests.fuzz.sdpa_programs import sdpa_programs
from tests.fuzz.regressions import REGRESSIONS

# The CI profile runs 40 examples per test; programs are cheap (~0.3 s each), so this test runs
# more. The long profile's count (2000) is used as is.
EXAMPLES = max(settings.default.max_examples, 150)
# Shrinking recompiles the program hundreds of times (minutes): not in CI, where the failing
# program is printed as generated (already small); every other profile shrinks.
SDPA_EXAMPLES = max(settings.default.max_examples, 60)  # ~1 s each (several compile twice: dynamic shapes)
PHASES = tuple(p for p in Phase if p is not Phase.shrink or os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci")


@settings(max_examples=EXAMPLES, phases=PHASES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs())
def test_compiled_equals_eager(program: Program):
    note(program.source)
    outcome = harness.check(program.source)
    family = "attention" if program.is_attention else "near-miss"
    event(f"{family}: {'fused' if outcome.fused else 'not fused'}")
    for _, why in outcome.refused:
        event(f"{family} refused: {_generic(why)}")


@settings(max_examples=SDPA_EXAMPLES, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=sdpa_programs())
def test_sdpa_compiled_equals_eager(program: Program):
    note(program.source)
    outcome = harness.check(program.source)
    event(f"sdpa: {'fused' if outcome.fused else 'not fused'}")


def _generic(reason: str) -> str:
    """A refusal reason without node names and numbers, so that events group."""
    return re.sub(r"\(\w+\)|\d+", "#", reason)[:100]


def _slug(source: str) -> str:
    first = source.strip().splitlines()[0].strip('"').split(":")[0]
    return re.sub(r"\W+", "-", first).strip("-")[:60]


# Regressions that are features not built yet (the program runs correctly, unfused): strict
# xfails, so each flips to a failure — and must leave this list — once the pass fuses it.
KNOWN_GAPS: dict[str, str] = {
    "autocast-fp16-single-key-einsum-not-fused": "P·V over one key under float16 autocast: float32 P·V of float16 probabilities",
}


def _regression_params():
    for source in REGRESSIONS:
        slug = _slug(source).replace("_", "-")
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[slug])] if slug in KNOWN_GAPS else []
        yield pytest.param(source, id=_slug(source), marks=marks)


@pytest.mark.parametrize("source", list(_regression_params()))
def test_regression(source: str):
    harness.check(source)
