"""The offload pass: attention over host-resident K/V → ``fa_dynamo::cooperative_attention``.

On this machine "device" and host are both the CPU: a KV cache that enters the graph as an input
is host-resident, keys computed in the graph are device-resident, and the budget forces the split
point. The pattern a GPU would see (a CPU tensor copied to the device inside the graph) is checked
structurally with fake CUDA tensors; running it needs a GPU.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from fa_dynamo.passes.matching import op_arguments
from fa_dynamo import FastAttentionBackend, resolve_config
from fa_dynamo.kernels.cooperative import op as cooperative
from fa_dynamo.passes.manager import run_passes
from tests.conftest import ATTENTION_OP, Compiled, assert_same_as_eager, count_ops

COOPERATIVE_OP = torch.ops.fa_dynamo.cooperative_attention.default
aten = torch.ops.aten
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
D_MODEL = HEADS * HEAD_DIM
PER_KEY = KV_HEADS * 2 * HEAD_DIM * 4  # bytes of K+V per key (batch 1, fp32)


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class CachedAttention(torch.nn.Module):
    """One attention layer reading a KV cache given as inputs, keys of the new tokens computed here.

    ``order``: where the cache sits in the key axis (``past_first`` as in every decoder, or
    ``past_last``, or ``interleaved`` as a near-miss). Bottom-right causal band, optional key
    padding filled with ``finfo.min`` (as transformers does), GQA through ``repeat_kv``.
    """

    def __init__(self, order: str = "past_first"):
        super().__init__()
        self.order = order
        self.wq = torch.nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.wkv = torch.nn.Linear(D_MODEL, 2 * KV_HEADS * HEAD_DIM, bias=False)

    def forward(self, x, past_k, past_v, padding=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k_new, v_new = self.wkv(x).view(b, s, 2 * KV_HEADS, HEAD_DIM).transpose(1, 2).chunk(2, dim=1)
        past_k, past_v = past_k.to(x.device), past_v.to(x.device)
        if self.order == "past_first":
            k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
        elif self.order == "past_last":
            k, v = torch.cat([k_new, past_k], dim=2), torch.cat([v_new, past_v], dim=2)
        else:
            half = past_k.shape[2] // 2
            k = torch.cat([past_k[:, :, :half], k_new, past_k[:, :, half:]], dim=2)
            v = torch.cat([past_v[:, :, :half], v_new, past_v[:, :, half:]], dim=2)
        k, v = _repeat_kv(k, HEADS // KV_HEADS), _repeat_kv(v, HEADS // KV_HEADS)
        scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)
        sk = k.shape[2]
        i = torch.arange(sk - s, sk)[:, None]
        j = torch.arange(sk)[None, :]
        hidden = torch.finfo(scores.dtype).min  # as transformers fills its masks
        scores = scores.masked_fill(j > i, hidden)
        if padding is not None:  # [B, Sk] bool, True = padding
            scores = scores.masked_fill(padding[:, None, None, :], hidden)
        return torch.softmax(scores, dim=-1) @ v


def _inputs(past: int, new: int = 1, batch: int = 1, padded: bool = False):
    x = torch.randn(batch, new, D_MODEL)
    past_k, past_v = torch.randn(batch, KV_HEADS, past, HEAD_DIM), torch.randn(batch, KV_HEADS, past, HEAD_DIM)
    if not padded:
        return (x, past_k, past_v)
    padding = torch.zeros(batch, past + new, dtype=torch.bool)
    padding[0, : past // 3] = True  # left padding of the first sequence
    return (x, past_k, past_v, padding)


def _cooperative_nodes(compiled: Compiled) -> list:
    return [n for _, after in compiled.backend.graphs for n in after.graph.nodes if n.target is COOPERATIVE_OP]


def _offload_sites(compiled: Compiled) -> list:
    return [site for reports in compiled.backend.reports for rep in reports if rep.name == "offload" for site in rep.sites]


@pytest.fixture
def host_shares(monkeypatch):
    """Records ``(k0, keys)`` of every host share the worker thread computes."""
    seen = []
    real = cooperative._host_partial

    def spy(q_host, share, *args):
        seen.append((share.k0, share.num_keys))
        return real(q_host, share, *args)

    monkeypatch.setattr(cooperative, "_host_partial", spy)
    return seen


# --- the modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "on", "auto"])
def test_env_switch(monkeypatch, host_shares, mode):
    """FA_DYNAMO_OFFLOAD: off leaves fa_dynamo.attention; on rewrites; auto without a budget does not."""
    monkeypatch.setenv("FA_DYNAMO_OFFLOAD", mode)
    model = CachedAttention().eval()
    args = _inputs(past=40, new=1)
    compiled = Compiled(model)
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    rewritten = mode == "on"
    assert len(_cooperative_nodes(compiled)) == int(rewritten)
    assert sum(count_ops(after, ATTENTION_OP) for _, after in compiled.backend.graphs) == int(not rewritten)
    assert host_shares == ([(0, 40)] if rewritten else [])
    sites = _offload_sites(compiled)
    if mode == "off":
        assert sites == []  # the pass did not run
    elif mode == "auto":
        assert [(s.fused, s.reason) for s in sites] == [(False, sites[0].reason)] and "without a budget" in sites[0].reason


def test_rewritten_graph(host_shares):
    """The cache inputs go to the op as the host share (no cat, no repeat), the new keys as the device share."""
    model = CachedAttention().eval()
    args = _inputs(past=30, new=2)
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    (node,) = _cooperative_nodes(compiled)
    call = op_arguments(node)
    k_dev, k_host, v_host = call["k_dev"], call["k_host"], call["v_host"]
    assert k_host.op == v_host.op == "placeholder" and k_host is not v_host
    assert k_dev.meta["val"].shape == (1, KV_HEADS, 2, HEAD_DIM)  # the new keys, not repeated
    assert [call[n] for n in ("host_first", "budget_bytes", "strategy", "stage_bytes")] == [True, 0, "auto", 0]
    # fill and band: max_offset = Sk - Sq
    assert [call[n] for n in ("fill", "min_offset", "max_offset")] == [torch.finfo(torch.float32).min, None, 30]
    after = compiled.backend.graphs[0][1]
    assert not any(n.target is aten.cat.default for n in after.graph.nodes), "the KV was still gathered"
    assert host_shares == [(0, 30)]
    (site,) = _offload_sites(compiled)
    assert site.fused and site.kernel == "cooperative (auto)"


def test_auto_budget_sets_the_split_point(host_shares):
    """auto with a 1 MiB budget: K/V of 3001 keys (1.47 MiB) exceed it; the 2048 keys nearest
    the new token are attended to on the device, the 953 oldest stay on the host."""
    assert (1 << 20) % PER_KEY == 0
    model = CachedAttention().eval()
    args = _inputs(past=3000, new=1)
    compiled = Compiled(model, {"offload": "auto", "offload_budget_mb": 1})
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    (node,) = _cooperative_nodes(compiled)
    assert op_arguments(node)["budget_bytes"] == 1 << 20
    device_keys = (1 << 20) // PER_KEY
    assert host_shares == [(0, 3001 - device_keys)]


def test_auto_leaves_a_site_that_fits_the_budget():
    model = CachedAttention().eval()
    compiled = Compiled(model, {"offload": "auto", "offload_budget_mb": 1})
    with torch.no_grad():
        compiled(*_inputs(past=100))
    assert _cooperative_nodes(compiled) == []
    (site,) = _offload_sites(compiled)
    assert not site.fused and "fit the device budget" in site.reason


def test_on_with_a_budget_that_holds_everything_runs_the_plain_op(host_shares):
    """The budget is applied at run time: when all of K/V fits, nothing runs on the worker."""
    model = CachedAttention().eval()
    args = _inputs(past=100)
    compiled = Compiled(model, {"offload": "on", "offload_budget_mb": 1})
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    assert len(_cooperative_nodes(compiled)) == 1 and host_shares == []


def test_every_site_is_logged(monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fa_dynamo")
    logger.addHandler(handler)
    try:
        model = CachedAttention().eval()
        with torch.no_grad():
            Compiled(model, {"offload": "on", "log": "info"})(*_inputs(past=20))
            Compiled(model, {"offload": "auto", "log": "info"})(*_inputs(past=20))
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if "offload" in r.getMessage()]
    assert any("20 host key(s) before 1 device key(s), no budget" in line for line in lines), lines
    assert any("without a budget" in line for line in lines), lines


# --- shapes of K/V --------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_chunked_prefill_with_padding(padded, host_shares):
    """Sq = 5 new tokens after 60 cached ones (causal offset 60), a left-padded batch row."""
    model = CachedAttention().eval()
    args = _inputs(past=60, new=5, batch=2, padded=padded)
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    assert len(_cooperative_nodes(compiled)) == 1 and host_shares == [(0, 60)]


def test_cache_after_the_new_keys(host_shares):
    model = CachedAttention("past_last").eval()
    args = _inputs(past=25, new=3)
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad():
        # a causal band over [new | past] hides most of the past from the new rows: a real check of the shifted offsets
        assert_same_as_eager(compiled(*args), model(*args))
    (node,) = _cooperative_nodes(compiled)
    assert op_arguments(node)["host_first"] is False
    assert host_shares == [(3, 25)]


def test_whole_kv_on_the_host(host_shares):
    """Cross-attention to encoder K/V given as inputs: no device share at all."""

    def cross(q, k, v):
        return torch.softmax(q @ k.mT * 0.2, -1) @ v

    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 33, 16), torch.randn(2, 4, 33, 16)
    compiled = Compiled(cross, {"offload": "on"})
    assert_same_as_eager(compiled(q, k, v), cross(q, k, v))
    (node,) = _cooperative_nodes(compiled)
    assert op_arguments(node)["k_dev"] is None and op_arguments(node)["v_dev"] is None
    assert host_shares == [(0, 33)]


def test_dynamic_shapes_one_graph_for_every_cache_length(host_shares):
    """Decoding grows the cache: one dynamic graph (repeat_kv seen through there too), split at run time."""
    model = CachedAttention().eval()
    compiled = Compiled(model, {"offload": "on"}, dynamic=True)
    with torch.no_grad():
        for past in (17, 18, 50):
            args = _inputs(past=past)
            assert_same_as_eager(compiled(*args), model(*args))
    assert len(compiled.backend.graphs) == 1
    (node,) = _cooperative_nodes(compiled)
    assert op_arguments(node)["k_host"].meta["val"].shape[1] == KV_HEADS  # GQA reaches the op without repeat
    assert host_shares == [(0, 17), (0, 18), (0, 50)]


def test_stream_strategy_through_the_compiled_graph(monkeypatch):
    calls = []
    real = cooperative._stream
    monkeypatch.setattr(cooperative, "_stream", lambda *a: calls.append(a[-1]) or real(*a))
    model = CachedAttention().eval()
    args = _inputs(past=90, new=2)
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad(), cooperative.overrides(strategy="stream", stage_bytes=16 * PER_KEY):
        assert_same_as_eager(compiled(*args), model(*args))
    assert calls == [16 * PER_KEY]


def test_worker_failure_surfaces_from_the_compiled_model(monkeypatch):
    def broken(*args):
        raise RuntimeError("host worker crashed")

    monkeypatch.setattr(cooperative, "_host_partial", broken)
    model = CachedAttention().eval()
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad(), pytest.raises(RuntimeError, match="worker thread.*host worker crashed"):
        compiled(*_inputs(past=20))


def split_attention(q, k_dev, v_dev, k_host, v_host, padding):
    """Plain attention over K/V given in two parts, the host part moved to q's device explicitly."""
    k = torch.cat([k_host.to(q.device), k_dev], dim=2)
    v = torch.cat([v_host.to(q.device), v_dev], dim=2)
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    v = _repeat_kv(v, q.shape[1] // v.shape[1])
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    sq, sk = scores.shape[-2:]
    causal = torch.ones(sq, sk, dtype=torch.bool).triu(1 + sk - sq)
    scores = scores.masked_fill(causal | padding[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_inputs_split_between_host_and_device(monkeypatch, host_shares, heads, kv_heads, padded):
    """Both parts are graph inputs; the one the program moves ``.to(device)`` is the host share,
    the other is used where it is (the device share). FA_DYNAMO_OFFLOAD=on."""
    monkeypatch.setenv("FA_DYNAMO_OFFLOAD", "on")
    b, sq, host_keys, dev_keys, d = 2, 6, 45, 14, 16
    q = torch.randn(b, heads, sq, d)
    k_dev, v_dev = torch.randn(b, kv_heads, dev_keys, d), torch.randn(b, kv_heads, dev_keys, d)
    k_host, v_host = torch.randn(b, kv_heads, host_keys, d), torch.randn(b, kv_heads, host_keys, d)
    padding = torch.zeros(b, host_keys + dev_keys, dtype=torch.bool)
    if padded:
        padding[1, :20] = True
    args = (q, k_dev, v_dev, k_host, v_host, padding)
    compiled = Compiled(split_attention)
    assert_same_as_eager(compiled(*args), split_attention(*args))
    (node,) = _cooperative_nodes(compiled)
    shares = [op_arguments(node)[n] for n in ("k_dev", "v_dev", "k_host", "v_host")]
    assert all(n.op == "placeholder" for n in shares)  # no cat, no repeat left: the inputs themselves
    assert [n.meta["val"].shape[1:3] for n in shares] == [(kv_heads, dev_keys)] * 2 + [(kv_heads, host_keys)] * 2
    assert op_arguments(node)["host_first"] is True and host_shares == [(0, host_keys)]


# --- near-misses ----------------------------------------------------------------------------------


def test_device_only_kv_is_left_alone():
    def self_attention(x, w):
        q = k = v = (x @ w).unflatten(-1, (4, 16)).transpose(1, 2)
        return torch.softmax(q @ k.mT * 0.25, -1) @ v

    args = (torch.randn(1, 9, 64), torch.randn(64, 64))
    compiled = Compiled(self_attention, {"offload": "on"})
    assert_same_as_eager(compiled(*args), self_attention(*args))
    assert _cooperative_nodes(compiled) == []
    (site,) = _offload_sites(compiled)
    assert not site.fused and "not read from host memory" in site.reason


def test_interleaved_host_and_device_keys_are_left_alone():
    model = CachedAttention("interleaved").eval()
    args = _inputs(past=20)
    compiled = Compiled(model, {"offload": "on"})
    with torch.no_grad():
        assert_same_as_eager(compiled(*args), model(*args))
    assert _cooperative_nodes(compiled) == []
    (site,) = _offload_sites(compiled)
    assert "interleave" in site.reason


def test_k_and_v_split_differently_are_left_alone():
    def skewed(q, k_new, v_new, past_k, past_v):
        k = torch.cat([past_k, k_new], dim=2)
        v = torch.cat([past_v, v_new], dim=2)
        return torch.softmax(q @ k.mT * 0.25, -1) @ v

    q = torch.randn(1, 2, 1, 16)
    args = (q, torch.randn(1, 2, 1, 16) * 1, torch.randn(1, 2, 2, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16))
    compiled = Compiled(lambda q, kn, vn, pk, pv: skewed(q, kn + 0, vn + 0, pk, pv), {"offload": "on"})
    assert_same_as_eager(compiled(*args), skewed(*args))
    (site,) = _offload_sites(compiled)
    assert not site.fused and "split of K and V" in site.reason


# --- what a GPU would see -------------------------------------------------------------------------


def test_host_tensor_copied_to_the_device_is_rewritten_structurally():
    """With fake CUDA tensors (no GPU needed): the past K/V are CPU tensors copied to cuda inside
    the graph, and a round trip of the new keys through the host is seen through. After the
    pass, no copy of the cache to the device is left, and the graph still traces (the op's
    fake implementation accepts a CPU host share beside CUDA tensors)."""

    def layer(x, wk, wv, q, past_k, past_v):
        k_new = (x @ wk).unflatten(-1, (2, 16)).transpose(1, 2)
        v_new = (x @ wv).unflatten(-1, (2, 16)).transpose(1, 2)
        k = torch.cat([past_k, k_new.to("cpu")], dim=-2).to(q.device)  # a cache kept on the host
        v = torch.cat([past_v, v_new.to("cpu")], dim=-2).to(q.device)
        return torch.softmax(q @ k.mT * 0.25, -1) @ v

    with FakeTensorMode():
        cuda = torch.device("cuda")
        args = (torch.randn(1, 1, 32, device=cuda), torch.randn(32, 32, device=cuda), torch.randn(32, 32, device=cuda),
                torch.randn(1, 2, 1, 16, device=cuda), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
        gm = make_fx(layer, pre_dispatch=True, tracing_mode="fake")(*args)
        run_passes(gm, resolve_config({"strict": True, "offload": "on"}, environ={}))
        (node,) = [n for n in gm.graph.nodes if n.target is COOPERATIVE_OP]
        call = op_arguments(node)
        k_dev, k_host = call["k_dev"], call["k_host"]
        assert k_host.op == "placeholder" and k_host.meta["val"].device.type == "cpu"
        assert k_dev.meta["val"].device.type == "cuda" and call["host_first"] is True
        to_cuda = [n for n in gm.graph.nodes if n.target is aten.to.dtype_layout and n.kwargs.get("device") == cuda]
        assert to_cuda == [], "the cache is still copied to the device"
        out = make_fx(gm, tracing_mode="fake")(*args)(*args)
        assert out.device.type == "cuda" and out.shape == (1, 2, 1, 16)


# --- the recipe: generation with the KV cache in host memory --------------------------------------


def test_recipe_long_context_generation_matches(host_shares):
    """examples/offload_generation.py: a 2-layer Llama (GQA), an 1100-token prompt, 8 greedy tokens
    with the cache in host memory, compiled with offload on and a 1 MiB budget (1024 keys per
    layer on the device, the rest on the host, the split moving every step); served by the host
    cores, then streamed in 64 KiB blocks. Identical tokens to the eager, non-offloaded run."""
    pytest.importorskip("transformers")
    from examples.offload_generation import generate, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    prompt = torch.randint(3, 256, (1, 1100))
    new = 8
    with torch.no_grad():
        expected = generate(model, prompt, new, host_cache=False)  # eager, the cache on the "device"
        backend = FastAttentionBackend({"offload": "on", "offload_budget_mb": 1, "inner": "eager", "strict": True},
                                       keep_graphs=True)
        assert torch.equal(generate(model, prompt, new, backend=backend), expected)
        rewritten = [n for _, after in backend.graphs for n in after.graph.nodes if n.target is COOPERATIVE_OP]
        assert len(backend.graphs) == 3  # prefill, first decode step, then one dynamic graph
        assert len(rewritten) == 2 * 2  # both layers of both decode graphs (prefill K/V are all new)
        device_keys = (1 << 20) // (2 * 2 * 64 * 4)  # 2 KV heads × (K + V) × head dim 64 × fp32: 1 KiB a key
        assert host_shares == [(0, past + 1 - device_keys) for past in range(1100, 1100 + new - 1) for _layer in (0, 1)]
        with cooperative.overrides(strategy="stream", stage_bytes=64 << 10):
            assert torch.equal(generate(model, prompt, new, backend=backend), expected)  # compiled above
        assert len(backend.graphs) == 3
