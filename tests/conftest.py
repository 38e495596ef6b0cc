"""Shared test helpers: a backend that keeps graphs, op counting, float64 references."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # tests/kernels/test_triton.py runs the Triton kernels in Triton's
    os.environ.setdefault("TRITON_INTERPRET", "1")  # interpreter; this must precede any import of triton

from hypothesis import settings  # noqa: E402

from fa_dynamo import FastAttentionBackend  # noqa: E402
from tests.kernels.fake_xformers import fake_xformers  # noqa: E402,F401  (a fixture for every test module)

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ATTENTION_OP = torch.ops.fa_dynamo.attention.default


def generator_for(*case) -> torch.Generator:
    """A generator seeded from a test case's parameters, the same in every process (``hash()``
    of a string is salted per process, so a seed drawn from it cannot be replayed)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def count_ops(gm: torch.fx.GraphModule, target=ATTENTION_OP) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def count_softmax(gm: torch.fx.GraphModule) -> int:
    packets = (torch.ops.aten.softmax, torch.ops.aten._softmax)
    return sum(1 for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in packets)


class Compiled:
    """``fn`` compiled with a graph-keeping backend (strict, inner eager unless overridden)."""

    def __init__(self, fn, options=None, dynamic=None):
        torch._dynamo.reset()
        opts = {"strict": True, "inner": "eager"}
        opts.update(options or {})
        self.backend = FastAttentionBackend(opts, keep_graphs=True)
        self.fn = torch.compile(fn, backend=self.backend, dynamic=dynamic, fullgraph=True)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def fused(self) -> int:
        return sum(count_ops(after) for _, after in self.backend.graphs)

    @property
    def refused(self) -> list:
        return [r for reports in self.backend.reports for rep in reports for r in rep.refused]


def assert_same_as_eager(actual: torch.Tensor, expected: torch.Tensor, atol=None, rtol=None) -> None:
    """Equal within dtype tolerances, with NaN exactly where eager has NaN."""
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN pattern differs from eager"
    tol = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-8), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
    a, r = tol[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol or a, rtol=rtol or r, equal_nan=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (the full corpus matrix, the training benchmark's smoke run, GPU
    compiles) are skipped unless a marker expression is given: ``pytest -m slow``."""
    if config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
