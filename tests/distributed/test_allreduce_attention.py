"""The paper's form of tiling-AllReduce: fused attention → o_proj → all_reduce cut along the sequence.

First, single-process: a query-row slice of the attention op (``_query_row_arguments``) computes exactly
those rows of the whole op, for Sq != Sk, bands, per-query biases, broadcast masks and segment ids.
Then on 2 gloo ranks: Megatron-style attention blocks compile to C attention ops and C all_reduces
and match eager; near-misses keep the attention whole (the matmul is still tiled).
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from tests.distributed.spawn import run_ranks
from tests.distributed.test_allreduce import TOL, _compile, _counts

ATTENTION = "fa_dynamo.attention.default"


# --- a query-row slice of the op is those rows of the op (single process) ---------------------


def _rows_of_op(inputs: dict, params: dict, bounds: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole op's output, cat of the outputs of its query-row slices), both through one FX graph."""
    from fa_dynamo.passes.allreduce.attention_split import query_row_arguments

    graph = fx.Graph()
    nodes = {}
    for name, t in inputs.items():
        nodes[name] = None if t is None else graph.placeholder(name)
        if t is not None:
            nodes[name].meta["val"] = t
    args = (nodes["q"], nodes["k"], nodes["v"], nodes["bias"], nodes["mask"], params["scale"], 0.0, float("-inf"),
            params["lo"], params["hi"], params["kernel"], 16, 16)
    whole = graph.call_function(torch.ops.fa_dynamo.attention.default, args,
                                {"q_segments": nodes["q_segments"], "k_segments": nodes["k_segments"]})
    parts = []
    for start, end in bounds:
        part = graph.call_function(whole.target, (), query_row_arguments(graph, whole, start, end))
        parts.append(graph.call_function(operator.getitem, (part, 0)))
    graph.output((graph.call_function(operator.getitem, (whole, 0)), graph.call_function(torch.cat, (parts, 2))))
    return fx.GraphModule({}, graph)(*[t for t in inputs.values() if t is not None])


@pytest.mark.parametrize("kernel", ["cpu", "reference", "sdpa"])
@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37), (29, 29)])
@pytest.mark.parametrize("band", ["none", "causal_bottom_right", "sliding", "band"])
def test_query_row_slices_are_the_rows_of_the_whole_op(kernel, sq, sk, band):
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    b, h, d = 2, 3, 8
    lo, hi = {"none": (None, None), "causal_bottom_right": (None, sk - sq), "sliding": (-(9 - 1) + sk - sq, sk - sq),
              "band": (-5, 7)}[band]
    q_ids = torch.sort(torch.randint(0, 3, (b, sq), generator=g), dim=1).values
    k_ids = torch.sort(torch.randint(0, 3, (b, sk), generator=g), dim=1).values
    inputs = {
        "q": torch.randn(b, h, sq, d, generator=g), "k": torch.randn(b, h, sk, d, generator=g),
        "v": torch.randn(b, h, sk, d, generator=g),
        "bias": torch.randn(1, h, sq, sk, generator=g),  # per query row: must be sliced
        "mask": torch.rand(b, 1, 1, sk, generator=g) < 0.2,  # broadcast over query rows: must not
        "q_segments": q_ids, "k_segments": k_ids,
    }
    whole, split = _rows_of_op(inputs, {"scale": d ** -0.5, "lo": lo, "hi": hi, "kernel": kernel},
                               [(0, 5), (5, 6), (6, sq // 2), (sq // 2, sq)])
    assert split.shape == whole.shape
    assert whole.isfinite().any()  # the case is not all masked
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6, equal_nan=True)



def _o_proj_site(read_lse: bool):
    """The linear of a traced ``attention → [0] → transpose(1, 2) → reshape → linear``."""
    from torch.fx.experimental.proxy_tensor import make_fx


    def o_proj(q, k, v, w):
        out, lse = torch.ops.fa_dynamo.attention(q, k, v, None, None, 0.25, 0.0, float("-inf"), None, 0, "cpu", 16, 16)
        y = torch.nn.functional.linear(out.transpose(1, 2).reshape(2, 12, -1), w)
        return (y, lse) if read_lse else y

    g = torch.Generator().manual_seed(7)
    gm = make_fx(o_proj, pre_dispatch=True)(*(torch.randn(2, 3, 12, 8, generator=g) for _ in range(3)),
                                           torch.randn(16, 24, generator=g))
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    return linear


def test_the_chain_to_the_o_proj_is_recognized():
    from fa_dynamo.passes.allreduce.attention_split import match_attention

    chain = match_attention(_o_proj_site(read_lse=False))
    assert chain is not None and chain.seq == 12
    assert [str(n.target) for n in chain.nodes] == ["<built-in function getitem>", "aten.transpose.int", "aten.reshape.default"]


def test_an_operand_of_unknown_kind_keeps_the_attention_whole(monkeypatch):
    """If the op's signature grows, the split stops until the new operand is classified."""
    from fa_dynamo.passes.allreduce import attention_split

    monkeypatch.setattr(attention_split, "_QUERY_INDEPENDENT", attention_split._QUERY_INDEPENDENT - {"k_segments"})
    with pytest.raises(attention_split.NotSplit, match="k_segments"):
        attention_split.match_attention(_o_proj_site(read_lse=False))


def test_a_read_log_sum_exp_keeps_the_attention_whole():
    from fa_dynamo.passes.allreduce import attention_split

    with pytest.raises(attention_split.NotSplit, match="log-sum-exp"):
        attention_split.match_attention(_o_proj_site(read_lse=True))

# --- what runs on each rank (module level: spawned processes import it) -----------------------


class AttentionOProj(torch.nn.Module):
    """Megatron-style attention over this rank's heads, with a KV cache of ``past`` tokens
    (Sq != Sk), then the row-parallel ``o_proj`` and its ``dist.all_reduce``; ``x`` plus that.

    ``mask``: ``causal`` (a band with offset ``past``), ``sliding`` (a band of ``window`` keys),
    ``bias_padding`` (an additive per-query bias and a boolean key-padding mask, passed to the op
    as tensors), ``read_twice`` (the attention output is also returned: a near-miss),
    ``flatten_heads`` (causal, heads merged by ``flatten(2)``), ``flattened`` (o_proj over
    ``[B·Sq, H·Dv]`` rows: a near-miss).
    """

    def __init__(self, rank: int, world: int, mask: str, dim=64, heads=4, window=9):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        w = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])  # noqa: E731
        qkv, o = w(3 * dim, dim), w(dim, dim)
        self.heads, self.head_dim, self.mask, self.window = heads // world, dim // heads, mask, window
        shard = lambda t, d: t.chunk(world, d)[rank].contiguous()  # noqa: E731
        self.qkv = torch.nn.Parameter(torch.cat([shard(p, 0) for p in qkv.chunk(3, 0)]), requires_grad=False)
        self.o = torch.nn.Parameter(shard(o, 1), requires_grad=False)

    def forward(self, x, past_k, past_v, bias, padding):
        b, t, _ = x.shape
        q, k, v = torch.nn.functional.linear(x, self.qkv).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        past, keys = past_k.shape[2], k.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.mask == "sliding":
            i = torch.arange(t)[:, None] + past
            j = torch.arange(keys)[None, :]
            scores = scores.masked_fill((j > i) | (j <= i - self.window), float("-inf"))
        elif self.mask == "bias_padding":
            scores = (scores + bias).masked_fill(padding, float("-inf"))
        else:
            scores = scores + torch.triu(torch.full((t, keys), float("-inf")), diagonal=past + 1)
        a = torch.softmax(scores, dim=-1) @ v
        if self.mask == "flattened":
            y = torch.nn.functional.linear(a.transpose(1, 2).reshape(b * t, -1), self.o).view(b, t, -1)
        elif self.mask == "flatten_heads":
            y = torch.nn.functional.linear(a.transpose(1, 2).flatten(2), self.o)
        else:
            y = torch.nn.functional.linear(a.transpose(1, 2).reshape(b, t, -1), self.o)
        dist.all_reduce(y)
        return (x + y, a) if self.mask == "read_twice" else x + y


def _inputs(block: AttentionOProj, seq: int, past: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, block.heads, block.head_dim
    padding = torch.rand(b, 1, 1, past + seq, generator=g) < 0.2
    padding[..., -1] = False  # every query row sees at least its last key
    return (torch.randn(b, seq, 64, generator=g), torch.randn(b, h, past, d, generator=g),
            torch.randn(b, h, past, d, generator=g), torch.randn(1, h, seq, past + seq, generator=g), padding)


def _attention_block(rank: int, mask: str, options: dict, dynamic=False, lengths=((37, 11),)) -> dict:
    block = AttentionOProj(rank, dist.get_world_size(), mask)
    fn, backend = _compile(block, options, dynamic=dynamic)
    diffs = []
    with torch.no_grad():
        for i, (seq, past) in enumerate(lengths):
            inputs = _inputs(block, seq, past, seed=20 + rank + i)
            eager, compiled = block(*inputs), fn(*inputs)
            pairs = zip(eager, compiled) if isinstance(eager, tuple) else [(eager, compiled)]
            diffs.append(max((c - e).abs().max().item() for e, c in pairs))
    after = [a for _, a in backend.graphs]
    return {
        "diffs": diffs,
        "before": [_counts(b) for b, _ in backend.graphs],
        "after": [_counts(a) for a in after],
        "attention_ops": [sum(str(n.target) == ATTENTION for n in a.graph.nodes) for a in after],
        "sites": [(s.fused, s.reason, s.chunks, s.split_attention)
                  for reports in backend.reports for r in reports if r.name == "allreduce" for s in r.sites],
    }


def _scenarios(rank: int) -> dict:
    import traceback

    out = {}
    for name, fn in [
        *[(mask, lambda mask=mask: _attention_block(rank, mask, {"allreduce_chunks": 3}))
          for mask in ("causal", "sliding", "bias_padding", "flatten_heads", "read_twice", "flattened")],
        ("causal_dynamic", lambda: _attention_block(rank, "causal", {"allreduce_chunks": 3}, dynamic=True,
                                                    lengths=((37, 11), (50, 7)))),
        ("causal_off", lambda: _attention_block(rank, "causal", {"allreduce": False, "allreduce_chunks": 3})),
    ]:
        try:
            out[name] = fn()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


# --- the tests --------------------------------------------------------------------------------


pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_scenarios, world_size=2, timeout_s=240)


def _get(results, name):
    for rank, res in enumerate(results):
        assert "error" not in res[name], f"rank {rank}, scenario {name}:\n{res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("name", ["causal", "sliding", "bias_padding", "flatten_heads", "causal_dynamic"])
def test_attention_is_split_with_its_all_reduce(results, name):
    for res in _get(results, name):
        assert max(res["diffs"]) < TOL
        assert res["before"][0] == {"all_reduce": 1, "wait": 1}
        assert all(a == {"all_reduce": 3, "wait": 3} for a in res["after"])
        assert all(n == 3 for n in res["attention_ops"])
        assert all(site == (True, "", 3, True) for site in res["sites"])


@pytest.mark.parametrize("name", ["read_twice", "flattened"])
def test_unclear_chains_keep_the_attention_whole(results, name):
    for res in _get(results, name):
        assert max(res["diffs"]) < TOL
        assert res["after"] == [{"all_reduce": 3, "wait": 3}]  # the matmul is still tiled by rows
        assert res["attention_ops"] == [1]
        assert res["sites"] == [(True, "", 3, False)]


def test_switched_off_leaves_attention_and_all_reduce_whole(results):
    for res in _get(results, "causal_off"):
        assert max(res["diffs"]) < TOL
        assert res["after"] == res["before"] == [{"all_reduce": 1, "wait": 1}]
        assert res["attention_ops"] == [1]
        assert res["sites"] == []

