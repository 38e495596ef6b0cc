"""Fuzz the tiling-AllReduce rewrite (issue 8) on random row-parallel linear shapes.

A hypothesis property over: batch dims, token count T (1..300, odd values included), K, N, the
matmul spelling (``F.linear`` with/without bias, ``x @ W`` with a 2-D weight, ``torch.matmul``,
``mm`` on a 2-D view, ``addmm``), fp32/bf16, reshapes and casts between the matmul and the
all_reduce, a bias or residual after the reduce, the collective spelling (in-place
``dist.all_reduce(y)`` and ``funcol.all_reduce(y, op, group)``), and forced chunk counts
C in {2, 3, 4, 7} (``{"allreduce_chunks": C}``). Each example asserts compiled == eager (dtype
tolerances) and that the after-graph holds C all_reduce calls per original when M >= C (M rows
below C give min(C, M) chunks; one row stays untiled).

Everything runs in this process on a **world-size-1** gloo process group, initialized once per
module. An all_reduce on one rank is the identity, so these examples check the *graph rewrite*
exactly (the row slicing, per-chunk matmuls and casts, concatenation, the reshapes back, and
where the waits land), not communication: the real 2-rank tests in ``test_allreduce.py`` remain
the communication check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import generator_for
from tests.distributed.spawn import free_port

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default

SPELLINGS = ("linear", "linear_bias", "at", "torch_matmul", "mm_view", "addmm")
# Between the matmul and the all_reduce: row-major reshapes and dtype casts.
CHAIN_STEPS = ("flatten_rows", "unsqueeze", "flatten_all", "cast")
AFTER = ("none", "bias", "residual")
COLLECTIVES = ("dist", "funcol_sum", "funcol_avg")
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


@pytest.fixture(scope="module")
def world1():
    """A one-rank gloo group for the whole module (torn down so later tests see no group)."""
    assert not dist.is_initialized(), "another test left a process group initialized"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def _program(spelling: str, chain: tuple, after: str, collective: str, group):
    """``fn(x, w, b, r)``: matmul → chain → all_reduce → wait [→ + bias | + residual]."""
    import torch.distributed._functional_collectives as funcol

    def fn(x, w, b, r):
        k = x.shape[-1]
        if spelling == "linear":
            y = F.linear(x, w)
        elif spelling == "linear_bias":
            y = F.linear(x, w, b)
        elif spelling == "at":
            y = x @ w.t()  # w is (N, K); the weight is 2-D either way
        elif spelling == "torch_matmul":
            y = torch.matmul(x, w.t())
        elif spelling == "mm_view":
            y = torch.mm(x.reshape(-1, k), w.t())
        else:  # addmm, one bias row broadcast over the tokens
            y = torch.addmm(b, x.reshape(-1, k), w.t())
        for step in chain:
            if step == "flatten_rows":
                y = y.reshape(-1, y.shape[-1])
            elif step == "unsqueeze":
                y = y.unsqueeze(0)
            elif step == "flatten_all":
                y = y.flatten()
            else:  # cast: fp32 → fp64, bf16 → fp32
                y = y.double() if y.dtype == torch.float32 else y.float()
        if collective == "dist":
            dist.all_reduce(y)
            z = y
        else:
            z = funcol.all_reduce(y, "sum" if collective == "funcol_sum" else "avg", group)
        if after == "bias":
            z = z + (b.to(z.dtype) if z.shape[-1] == b.shape[0] else 0.5)
        elif after == "residual":
            z = z + r
        return z

    return fn


def check_example(group, batch, t, k, n, spelling, dtype, chain, after, collective, chunks):
    torch._dynamo.reset()
    from fa_dynamo.backend import FastAttentionBackend

    g = generator_for(batch, t, k, n, spelling, chain, after, collective, chunks)
    x = torch.randn(*batch, t, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    fn = _program(spelling, chain, after, collective, group)
    core = _program(spelling, chain, "none", collective, group)
    with torch.no_grad():
        shape_dtype = core(x.clone(), w, b, None)
        if hasattr(shape_dtype, "wait"):  # funcol's AsyncCollectiveTensor: wait, as compiled code does
            shape_dtype = shape_dtype.wait()
        r = torch.randn(shape_dtype.shape, generator=g).to(shape_dtype.dtype)
        eager = fn(x.clone(), w, b, r)
        backend = FastAttentionBackend({"strict": True, "inner": "eager", "allreduce_chunks": chunks}, keep_graphs=True)
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(x.clone(), w, b, r)

    assert compiled.shape == eager.shape and compiled.dtype == eager.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(compiled, eager, atol=atol, rtol=rtol)

    m = math.prod(batch) * t  # token rows
    expected = chunks if m >= chunks else (m if m >= 2 else 1)
    assert len(backend.graphs) == 1
    before, after_gm = backend.graphs[0]
    n_before = sum(1 for nd in before.graph.nodes if nd.target is ALL_REDUCE)
    n_after = sum(1 for nd in after_gm.graph.nodes if nd.target is ALL_REDUCE)
    sites = [s for reports in backend.reports for rep in reports if rep.name == "allreduce" for s in rep.sites]
    assert n_before == 1, before.graph
    assert n_after == expected * n_before, (sites, after_gm.graph)
    assert len(sites) == 1 and sites[0].fused == (expected > 1), sites
    if expected > 1:
        assert sites[0].chunks == expected


shapes = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),  # batch dims
    st.one_of(st.integers(1, 300), st.integers(0, 149).map(lambda i: 2 * i + 1), st.integers(1, 9)),  # T
    st.integers(1, 48),  # K
    st.integers(1, 40),  # N
)


@settings(suppress_health_check=[HealthCheck.too_slow])  # "ci": 40 examples (~10 s); "long": 2000
@given(
    shape=shapes,
    spelling=st.sampled_from(SPELLINGS),
    dtype=st.sampled_from((torch.float32, torch.bfloat16)),
    chain=st.lists(st.sampled_from(CHAIN_STEPS), max_size=2).map(tuple),
    after=st.sampled_from(AFTER),
    collective=st.sampled_from(COLLECTIVES),
    chunks=st.sampled_from((2, 3, 4, 7)),
)
# Edges kept explicitly: one row (untiled), fewer rows than C (min(C, M) chunks), odd M over C = 7.
@example(shape=((), 1, 8, 4), spelling="linear", dtype=torch.float32, chain=(), after="none", collective="dist", chunks=2)
@example(shape=((1,), 5, 8, 4), spelling="addmm", dtype=torch.bfloat16, chain=("cast",), after="bias", collective="funcol_sum", chunks=7)
@example(shape=((3, 1), 299, 17, 9), spelling="mm_view", dtype=torch.float32, chain=("unsqueeze", "flatten_all"),
         after="residual", collective="dist", chunks=7)
def test_tiled_all_reduce_matches_eager(world1, shape, spelling, dtype, chain, after, collective, chunks):
    batch, t, k, n = shape
    check_example(world1, batch, t, k, n, spelling, dtype, chain, after, collective, chunks)
