"""The tiling-AllReduce pass on 2 gloo ranks (CPU): compiled == eager, C all_reduces per original,
switched off leaves the graph alone, near-misses stay untiled, a failing rank never hangs.

Every scenario runs inside one 2-rank job (``_scenarios``, started once per module) so the
processes and imports are paid once; each test then checks its scenario's result.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import RankError, run_ranks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

ALL_REDUCE = "_c10d_functional.all_reduce.default"
WAIT = "_c10d_functional.wait_tensor.default"


# --- what runs on each rank (module level: spawned processes import it) -----------------------


def _counts(gm) -> dict:
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return {"all_reduce": names.count(ALL_REDUCE), "wait": names.count(WAIT)}


def _compile(fn, options, dynamic=False):
    from fa_dynamo.backend import FastAttentionBackend

    torch._dynamo.reset()
    backend = FastAttentionBackend({"strict": True, "inner": "eager", **options}, keep_graphs=True)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic), backend


def _graph_summary(backend) -> dict:
    before = [_counts(b) for b, _ in backend.graphs]
    after = [_counts(a) for _, a in backend.graphs]
    sites = [(s.fused, s.reason, getattr(s, "chunks", 0))
             for reports in backend.reports for r in reports if r.name == "allreduce" for s in r.sites]
    return {"before": before, "after": after, "sites": sites}


class TPBlock(torch.nn.Module):
    """A Llama-style block, Megatron tensor parallel: qkv and gate/up column-parallel, o and down
    row-parallel, each row-parallel output all-reduced with ``dist.all_reduce`` (in place).

    Built from the full (unsharded) weights so the test can also check it against the 1-rank block.
    """

    def __init__(self, full: dict, rank: int, world: int, heads: int):
        super().__init__()
        dim = full["o"].shape[0]
        self.heads, self.head_dim = heads // world, dim // heads
        local = self.heads * self.head_dim
        q, k, v = full["qkv"].chunk(3, 0)
        shard = lambda w, d: w.chunk(world, d)[rank].contiguous()  # noqa: E731
        self.qkv = torch.nn.Parameter(torch.cat([shard(q, 0), shard(k, 0), shard(v, 0)]), requires_grad=False)
        self.o = torch.nn.Parameter(shard(full["o"], 1), requires_grad=False)
        gate, up = full["gate_up"].chunk(2, 0)
        self.gate_up = torch.nn.Parameter(torch.cat([shard(gate, 0), shard(up, 0)]), requires_grad=False)
        self.down = torch.nn.Parameter(shard(full["down"], 1), requires_grad=False)
        self.norm1 = torch.nn.RMSNorm(dim, eps=1e-6)
        self.norm2 = torch.nn.RMSNorm(dim, eps=1e-6)
        self.world, self.local = world, local

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.nn.functional.linear(self.norm1(x), self.qkv)
        q, k, v = h.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask, dim=-1) @ v
        y = torch.nn.functional.linear(a.transpose(1, 2).reshape(b, t, self.local), self.o)
        if self.world > 1:
            dist.all_reduce(y)
        x = x + y
        gate, up = torch.nn.functional.linear(self.norm2(x), self.gate_up).chunk(2, dim=-1)
        z = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.down)
        if self.world > 1:
            dist.all_reduce(z)
        return x + z


def _full_weights(dim=64, hidden=128, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])  # noqa: E731
    return {"qkv": w(3 * dim, dim), "o": w(dim, dim), "gate_up": w(2 * hidden, dim), "down": w(dim, hidden)}


def _block_scenario(rank: int, options: dict, batch=2, seq=48, heads=4) -> dict:
    world = dist.get_world_size()
    full = _full_weights()
    block = TPBlock(full, rank, world, heads)
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = block(x)
        single = TPBlock(full, 0, 1, heads)(x)  # the unsharded block: checks the TP model itself
        fn, backend = _compile(block, options)
        compiled = fn(x)
    return {
        "compiled_vs_eager": (compiled - eager).abs().max().item(),
        "eager_vs_single": (eager - single).abs().max().item(),
        "attention_ops": sum(str(n.target) == "fa_dynamo.attention.default" for _, g in backend.graphs for n in g.graph.nodes),
        **_graph_summary(backend),
    }


def _profiled_calls(fn, *args) -> int:
    """How many all_reduce calls the profiler sees in one call of ``fn``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == "_c10d_functional::all_reduce")


def _row_parallel(x, w):
    y = torch.nn.functional.linear(x, w)
    dist.all_reduce(y)
    return y


def _funcol_forms(rank: int) -> dict:
    """The spellings the pass must tile: funcol, mm + view, matmul, addmm, a bias/residual after."""
    import torch.distributed._functional_collectives as funcol

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(2 + rank)
    x, w, bias = torch.randn(4, 30, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(16, generator=g)

    def funcol_matmul_bias(x, w, bias):  # x @ Wᵀ, funcol, bias and residual after the reduce
        return funcol.all_reduce(x @ w.t(), "sum", group) + bias + x[..., :16]

    def mm_then_view(x, w, bias):  # 2-D mm, reshaped back to 3-D before the (in-place) all_reduce
        y = torch.mm(x.reshape(-1, 24), w.t()).view(4, 30, 16)
        dist.all_reduce(y)
        return y

    def addmm_cast(x, w, bias):  # addmm with a broadcast bias, cast before the reduce, avg
        y = torch.addmm(bias, x.reshape(-1, 24), w.t()).double()
        return funcol.all_reduce(y, "avg", group)

    out = {}
    for name, fn in [("funcol_matmul_bias", funcol_matmul_bias), ("mm_then_view", mm_then_view), ("addmm_cast", addmm_cast)]:
        eager = fn(x, w, bias)
        compiled_fn, backend = _compile(fn, {"allreduce_chunks": 3})
        compiled = compiled_fn(x, w, bias)
        out[name] = {"diff": (compiled - eager).abs().max().item(), "shape_ok": compiled.shape == eager.shape,
                     "dtype_ok": compiled.dtype == eager.dtype, **_graph_summary(backend)}
    compiled_fn, _ = _compile(_row_parallel, {"allreduce_chunks": 3})
    compiled_fn(x, w)
    out["profiler_tiled"] = _profiled_calls(compiled_fn, x, w)
    compiled_fn, _ = _compile(_row_parallel, {"allreduce": False})
    compiled_fn(x, w)
    out["profiler_untiled"] = _profiled_calls(compiled_fn, x, w)
    return out


def _near_misses(rank: int) -> dict:
    """Sites that must stay untiled, with the reason, and still compute what eager computes."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 40, 24, generator=g), torch.randn(16, 24, generator=g)

    def partial_read(x, w):  # the partial sums are read before the in-place reduce
        y = torch.nn.functional.linear(x, w)
        before = y * 2
        dist.all_reduce(y)
        return y + before

    def batched_weight(x, w):  # bmm-like matmul: not a linear layer
        y = x @ w.t().expand(2, 24, 16)
        dist.all_reduce(y)
        return y

    def not_a_matmul(x, w):
        y = x.sin()
        dist.all_reduce(y)
        return y

    out = {}
    for name, fn in [("partial_read", partial_read), ("batched_weight", batched_weight), ("not_a_matmul", not_a_matmul)]:
        eager = fn(x.clone(), w)
        compiled_fn, backend = _compile(fn, {"allreduce_chunks": 4})
        out[name] = {"diff": (compiled_fn(x.clone(), w) - eager).abs().max().item(), **_graph_summary(backend)}
    return out


def _cost_model_choice(rank: int) -> dict:
    """allreduce_chunks=0: the cost model tiles a prefill-sized M and leaves decode alone."""
    from fa_dynamo.passes.allreduce import cost

    g = torch.Generator().manual_seed(4 + rank)
    w = torch.randn(1024, 64, generator=g)
    out = {}
    for name, m in (("prefill", 2048), ("decode", 4)):
        x = torch.randn(1, m, 64, generator=g)
        eager = _row_parallel(x.clone(), w)
        compiled_fn, backend = _compile(_row_parallel, {})
        out[name] = {"diff": (compiled_fn(x.clone(), w) - eager).abs().max().item(),
                     "expected_chunks": cost.choose_chunks(m, 64, 1024, 4, 2, cost.CPU_GLOO), **_graph_summary(backend)}
    return out


def _dynamic_tokens(rank: int) -> dict:
    """dynamic=True: one graph tiled for M >= C (guarded), a recompiled one below it."""
    g = torch.Generator().manual_seed(5 + rank)
    w = torch.randn(16, 24, generator=g)
    compiled_fn, backend = _compile(_row_parallel, {"allreduce_chunks": 4}, dynamic=True)
    diffs = []
    for m in (37, 50, 2, 1):
        x = torch.randn(1, m, 24, generator=g)
        diffs.append((compiled_fn(x.clone(), w) - _row_parallel(x.clone(), w)).abs().max().item())
    return {"diffs": diffs, **_graph_summary(backend)}


class LlamaBlock(torch.nn.Module):
    """A Llama-style block with plain ``nn.Linear`` layers, for DTensor ``parallelize_module``:
    q/k/v and gate/up column-parallel, o and down row-parallel (see ``_dtensor_block``)."""

    def __init__(self, dim=64, hidden=128, heads=4):
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))  # -1: the local heads' width
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _dtensor_block():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    block = LlamaBlock().requires_grad_(False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {"q": col, "k": col, "v": col, "o": row, "gate": col, "up": col, "down": row}
    return parallelize_module(block, mesh, plan)


def _dtensor(rank: int, options: dict) -> dict:
    """DTensor ColwiseParallel/RowwiseParallel through the backend: its all_reduces appear once
    aot_autograd desugars the DTensors, and the passes run on that forward graph."""
    block = _dtensor_block()
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(6))
    eager = block(x)
    fn, backend = _compile(block, options)
    compiled = fn(x)
    return {
        "diff": (compiled - eager).abs().max().item(),
        "attention_ops": sum(str(n.target) == "fa_dynamo.attention.default" for _, g in backend.graphs for n in g.graph.nodes),
        **_graph_summary(backend),
    }


def _scenarios(rank: int) -> dict:
    import traceback

    out = {}
    for name, fn in [
        ("block_c4", lambda: _block_scenario(rank, {"allreduce_chunks": 4})),
        ("block_c3_odd_rows", lambda: _block_scenario(rank, {"allreduce_chunks": 3}, batch=1, seq=37)),
        ("block_off", lambda: _block_scenario(rank, {"allreduce": False, "allreduce_chunks": 4})),
        ("block_cost_model", lambda: _block_scenario(rank, {})),
        ("forms", lambda: _funcol_forms(rank)),
        ("near_misses", lambda: _near_misses(rank)),
        ("cost_model", lambda: _cost_model_choice(rank)),
        ("dynamic", lambda: _dynamic_tokens(rank)),
        ("dtensor", lambda: _dtensor(rank, {"allreduce_chunks": 4})),
        ("dtensor_off", lambda: _dtensor(rank, {"allreduce": False, "allreduce_chunks": 4})),
    ]:
        try:
            out[name] = fn()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def _rank_fails(rank: int) -> float:
    fn, _ = _compile(_row_parallel, {"allreduce_chunks": 2})
    if rank == 1:
        raise ValueError("rank 1 fails before the collective")
    return fn(torch.ones(2, 8), torch.ones(4, 8)).sum().item()  # rank 0 waits for rank 1 in all_reduce


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_scenarios, world_size=2, timeout_s=240)


def _get(results, name):
    for rank, res in enumerate(results):
        assert "error" not in res[name], f"rank {rank}, scenario {name}:\n{res[name]['error']}"
    return [res[name] for res in results]


TOL = 1e-5


@pytest.mark.parametrize("name,chunks", [("block_c4", 4), ("block_c3_odd_rows", 3)])
def test_megatron_block_matches_eager_with_c_all_reduces_per_original(results, name, chunks):
    for res in _get(results, name):
        assert res["eager_vs_single"] < 1e-4  # the TP block is the unsharded block
        assert res["compiled_vs_eager"] < TOL
        assert res["attention_ops"] == chunks  # fused by the attention pass, split with the o_proj's chunks
        assert res["before"] == [{"all_reduce": 2, "wait": 2}]
        assert res["after"] == [{"all_reduce": 2 * chunks, "wait": 2 * chunks}]
        assert [fused for fused, _, _ in res["sites"]] == [True, True]
        assert [c for _, _, c in res["sites"]] == [chunks, chunks]


def test_switched_off_leaves_the_graph_untouched(results):
    for res in _get(results, "block_off"):
        assert res["compiled_vs_eager"] < TOL
        assert res["attention_ops"] == 1
        assert res["after"] == res["before"] == [{"all_reduce": 2, "wait": 2}]
        assert res["sites"] == []


def test_cost_model_leaves_a_small_block_untiled(results):
    for res in _get(results, "block_cost_model"):
        assert res["compiled_vs_eager"] < TOL
        assert res["after"] == [{"all_reduce": 2, "wait": 2}]
        assert all(not fused and "predicts no gain" in why for fused, why, _ in res["sites"])


@pytest.mark.parametrize("form", ["funcol_matmul_bias", "mm_then_view", "addmm_cast"])
def test_spellings_are_tiled(results, form):
    for res in _get(results, "forms"):
        r = res[form]
        assert r["shape_ok"] and r["dtype_ok"]
        assert r["diff"] < TOL
        assert r["before"] == [{"all_reduce": 1, "wait": 1}]
        assert r["after"] == [{"all_reduce": 3, "wait": 3}]


def test_profiler_sees_c_calls_per_original(results):
    for res in _get(results, "forms"):
        assert res["profiler_tiled"] == 3
        assert res["profiler_untiled"] == 1


@pytest.mark.parametrize("case,reason", [
    ("partial_read", "also read by"),
    ("batched_weight", "batched matmul"),
    ("not_a_matmul", "not a matmul"),
])
def test_near_misses_stay_untiled(results, case, reason):
    for res in _get(results, "near_misses"):
        r = res[case]
        assert r["diff"] < TOL
        assert r["after"] == r["before"]
        assert len(r["sites"]) == 1 and not r["sites"][0][0] and reason in r["sites"][0][1]


def test_cost_model_tiles_prefill_not_decode(results):
    for res in _get(results, "cost_model"):
        prefill, decode = res["prefill"], res["decode"]
        assert prefill["expected_chunks"] > 1 and decode["expected_chunks"] == 1
        assert prefill["diff"] < TOL and decode["diff"] < TOL
        assert prefill["after"] == [{"all_reduce": prefill["expected_chunks"], "wait": prefill["expected_chunks"]}]
        assert decode["after"] == decode["before"]
        assert "predicts no gain" in decode["sites"][0][1]


def test_dynamic_token_count(results):
    for res in _get(results, "dynamic"):
        assert max(res["diffs"]) < TOL
        tiled = [a["all_reduce"] for a in res["after"]]
        assert 4 in tiled and 1 in tiled, res  # a guarded tiled graph for M >= 4, an untiled one below


def test_dtensor_parallelize_module_is_tiled_through_the_backend(results):
    for res in _get(results, "dtensor"):
        assert res["diff"] < TOL
        assert res["attention_ops"] == 4  # fused on aot_autograd's graph, then split with the o_proj's chunks
        assert res["before"] == [{"all_reduce": 2, "wait": 2}]
        assert res["after"] == [{"all_reduce": 8, "wait": 8}]
        assert res["sites"] == [(True, "", 4), (True, "", 4)]


def test_dtensor_switched_off_leaves_the_graph_untouched(results):
    for res in _get(results, "dtensor_off"):
        assert res["diff"] < TOL
        assert res["attention_ops"] == 1
        assert res["after"] == res["before"] == [{"all_reduce": 2, "wait": 2}]
        assert res["sites"] == []


def test_a_failing_rank_is_an_error_not_a_hang():
    with pytest.raises(RankError) as info:
        run_ranks(_rank_fails, world_size=2, timeout_s=120, grace_s=30)
    reports = info.value.reports
    assert "rank 1 fails before the collective" in reports[1]
    assert 0 in reports  # rank 0's collective broke (peer gone) or it was killed at the deadline


def test_no_process_group_is_a_no_op():
    from fa_dynamo.backend import FastAttentionBackend

    assert not dist.is_initialized()
    backend = FastAttentionBackend({"strict": True, "inner": "eager", "allreduce_chunks": 4}, keep_graphs=True)
    x, w = torch.randn(32, 8), torch.randn(8, 8)
    out = torch.compile(lambda x, w: torch.nn.functional.linear(x, w) + 1, backend=backend, fullgraph=True)(x, w)
    torch.testing.assert_close(out, x @ w.t() + 1)
    assert all(r.sites == [] for reports in backend.reports for r in reports if r.name == "allreduce")


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 1)])
def test_aot_matmul_and_linear_spellings_are_undone_without_changing_values(q_heads, kv_heads):
    """The DTensor path's clean-up (``normalize.undo_matmul_decomposition``) on a graph traced below
    autograd: batched ``@`` (broadcast K/V heads too) and N-D ``F.linear`` become one node each."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fa_dynamo.normalize import undo_matmul_decomposition

    def block(q, k, v, w):
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return torch.nn.functional.linear(a.transpose(1, 2).reshape(2, 13, -1), w)

    g = torch.Generator().manual_seed(8)
    args = (torch.randn(2, q_heads, 13, 8, generator=g), torch.randn(2, kv_heads, 13, 8, generator=g),
            torch.randn(2, kv_heads, 13, 8, generator=g), torch.randn(5, 8 * q_heads, generator=g))
    gm = make_fx(block)(*args)
    targets = lambda: [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert "aten.bmm.default" in targets() and "aten.mm.default" in targets()
    assert undo_matmul_decomposition(gm) == 3
    assert targets().count("aten.matmul.default") == 2 and targets().count("aten.linear.default") == 1
    assert not {"aten.bmm.default", "aten.mm.default", "aten.expand.default"} & set(targets())
    torch.testing.assert_close(gm(*args), block(*args), rtol=0, atol=0)
