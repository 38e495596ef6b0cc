"""``fa_dynamo::cooperative_attention``: KV split between "device" and host memory, merged by LSE.

On this machine both shares are CPU tensors: the host share runs on the worker thread (``host``)
or through the double-buffered staging loop with CPU buffers standing in for pinned and device
memory (``stream``). The result must be the unsplit attention for any split point, band, mask,
GQA and budget; a failure on the worker must reach the caller; staging memory is measured.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fa_dynamo
from fa_dynamo.kernels.cooperative import op as cooperative
from fa_dynamo.kernels.cooperative.op import CostModel, choose_strategy, cooperative_attention, overrides
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.params import AttentionParams

NEG_INF = float("-inf")


def _case(b, hq, hkv, sq, sk, d, dtype=torch.float32, seed=0, masks=""):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    kw = {}
    if "causal" in masks:  # bottom-right causal: the last query sees every key (decode / chunked prefill)
        kw["max_offset"] = sk - sq
    if "window" in masks:
        kw["min_offset"] = -(1 + sk // 3)
    if "padding" in masks:  # left padding of row 0 of the batch: [B, 1, 1, Sk], True = hidden
        pad = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
        pad[0, ..., : sk // 4] = True
        kw["mask"] = pad
    if "bias" in masks:
        kw["bias"] = torch.randn(1, hq, sq, sk, generator=g).to(dtype)
    return q, k, v, kw


def _split(k, v, at, host_first):
    """``(k_dev, v_dev, k_host, v_host)`` with the host holding keys [0, at) (host_first) or [at, Sk)."""
    first = (k[:, :, :at], v[:, :, :at])
    last = (k[:, :, at:], v[:, :, at:])
    host, dev = (first, last) if host_first else (last, first)
    if dev[0].shape[2] == 0:
        dev = (None, None)
    return dev[0], dev[1], host[0], host[1]


def _per_key(k, v):
    return k.shape[0] * k.shape[1] * (k.shape[3] + v.shape[3]) * k.element_size()


def _check(out, q, k, v, kw):
    """Against float64 (the reference kernel on float64 inputs): at most 2× the error of the unsplit
    op in the same dtype, NaN exactly where it has NaN."""
    unsplit = fa_dynamo.attention(q, k, v, **kw)
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    ref = fa_dynamo.attention(q.double(), k.double(), v.double(), kernel="reference", **kw64)
    assert out.shape == unsplit.shape and out.dtype == q.dtype
    assert torch.equal(out.isnan(), unsplit.isnan()), "NaN pattern differs from the unsplit op"
    err = (out.double() - ref).nan_to_num().abs().max().item()
    unsplit_err = (unsplit.double() - ref).nan_to_num().abs().max().item()
    floor = {torch.float32: 2e-6, torch.float64: 1e-6, torch.bfloat16: 1e-2}[q.dtype]
    assert err <= 2 * unsplit_err + floor, f"error {err:.3g} vs the unsplit op's {unsplit_err:.3g}"


# --- equal to unsplit attention ---------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 1)]),  # (q heads, kv heads): GQA and MQA
    st.integers(1, 40),  # Sq
    st.integers(1, 120),  # Sk
    st.sampled_from([8, 24]),  # D
)


@given(
    shape=shapes,
    split=st.floats(0, 1),
    host_first=st.booleans(),
    strategy=st.sampled_from(["host", "stream"]),
    masks=st.sampled_from(["", "causal", "causal+padding", "window+causal", "padding", "bias+causal"]),
    stage_keys=st.sampled_from([1, 7, 64]),
    budget_keys=st.sampled_from([0, 5, 1000]),
    seed=st.integers(0, 2**16),
)
def test_equals_unsplit_attention(shape, split, host_first, strategy, masks, stage_keys, budget_keys, seed):
    b, (hq, hkv), sq, sk, d = shape
    q, k, v, kw = _case(b, hq, hkv, sq, sk, d, seed=seed, masks=masks)
    at = round(split * sk)
    k_dev, v_dev, k_host, v_host = _split(k, v, at, host_first)
    out = cooperative_attention(
        q, k_dev, v_dev, k_host, v_host, host_first=host_first, strategy=strategy,
        stage_bytes=stage_keys * _per_key(k, v), budget_bytes=budget_keys * _per_key(k, v), **kw,
    )
    _check(out, q, k, v, kw)


@pytest.mark.parametrize("at", [0, 1, 31, 63, 64])
@pytest.mark.parametrize("strategy", ["host", "stream"])
def test_causal_decode_chunk_every_split(at, strategy):
    """Sq=3 queries at the end of 64 keys (offset Sk - Sq), GQA 8:2, split anywhere."""
    q, k, v, kw = _case(2, 8, 2, 3, 64, 16, masks="causal+padding")
    out = cooperative_attention(q, *_split(k, v, at, True), strategy=strategy, stage_bytes=5 * _per_key(k, v), **kw)
    _check(out, q, k, v, kw)


@pytest.mark.parametrize("fill", [NEG_INF, torch.finfo(torch.float32).min, -3.0])
@pytest.mark.parametrize("strategy", ["host", "stream"])
def test_fully_masked_rows_and_finite_fills(fill, strategy):
    """Rows no share can see are NaN for -inf; finite fills take part in every share, as in eager."""
    q, k, v, kw = _case(1, 4, 2, 20, 30, 8, masks="padding")
    kw["mask"] = torch.rand(1, 1, 20, 30) > 0.5
    kw["mask"][..., 4, :] = True  # a fully masked row
    kw["max_offset"] = -3  # the band hides rows 0..2 entirely and every host key from some rows
    kw["fill"] = fill
    out = cooperative_attention(q, *_split(k, v, 11, True), strategy=strategy, stage_bytes=4 * _per_key(k, v), **kw)
    _check(out, q, k, v, kw)
    assert out[0, :, 4].isnan().all() == (fill == NEG_INF)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    q, k, v, kw = _case(1, 4, 2, 9, 50, 16, dtype=dtype, masks="causal")
    for strategy in ("host", "stream"):
        out = cooperative_attention(q, *_split(k, v, 20, False), host_first=False, strategy=strategy,
                                    stage_bytes=8 * _per_key(k, v), **kw)
        _check(out, q, k, v, kw)


def test_budget_moves_the_split_point():
    """The host keys next to the device share that fit the budget are attended to on the device."""
    q, k, v, kw = _case(1, 4, 2, 2, 40, 8, masks="causal")
    seen = []
    real = cooperative._host_partial

    def spy(q_host, share, *args):
        seen.append((share.k0, share.num_keys))
        return real(q_host, share, *args)

    per_key = _per_key(k, v)
    cooperative._host_partial = spy
    try:
        for budget_keys, expected in [(0, (0, 30)), (15, (0, 25)), (40, None), (1000, None)]:
            seen.clear()
            out = cooperative_attention(q, *_split(k, v, 30, True), budget_bytes=budget_keys * per_key, strategy="host", **kw)
            _check(out, q, k, v, kw)
            assert seen == ([expected] if expected else []), (budget_keys, seen)
        seen.clear()  # host last: the budget takes the host keys at the start of its share
        cooperative_attention(q, *_split(k, v, 10, False), host_first=False, budget_bytes=15 * per_key, strategy="host", **kw)
        assert seen == [(15, 25)]
    finally:
        cooperative._host_partial = real


def test_gradients_match_unsplit():
    q, k, v, kw = _case(1, 4, 2, 7, 25, 8, masks="causal+bias")
    bias = kw.pop("bias").requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    k_dev, v_dev, k_host, v_host = _split(leaves[1], leaves[2], 9, True)
    out = cooperative_attention(leaves[0], k_dev, v_dev, k_host, v_host, bias=bias, **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_bias = bias.detach().clone().requires_grad_()
    fa_dynamo.attention(*ref, bias=ref_bias, **kw).backward(grad)
    for ours, theirs in zip(leaves + [bias], ref + [ref_bias]):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_opcheck():
    q, k, v, kw = _case(1, 4, 2, 5, 23, 8, masks="causal+padding")
    bias = torch.randn(1, 4, 5, 23)
    op = torch.ops.fa_dynamo.cooperative_attention.default
    k_dev, v_dev, k_host, v_host = _split(k, v, 10, True)
    for args in [
        (q, k_dev, v_dev, k_host, v_host, None, kw["mask"], 0.3, 0.0, NEG_INF, None, 18, True, 0, "host", "cpu", 8, 8, 0),
        (q, k_host, v_host, k_dev, v_dev, bias, None, 0.3, 0.0, -1e9, -6, 4, False, 2000, "stream", "auto", 8, 8, 512),
        (q, None, None, k, v, None, None, 0.3, 2.0, NEG_INF, None, None, True, 0, "auto", "reference", 8, 8, 0),
        (q.clone().requires_grad_(), k_dev.clone().requires_grad_(), v_dev, k_host.clone().requires_grad_(), v_host,
         bias, None, 0.3, 0.0, NEG_INF, None, 18, True, 0, "host", "cpu", 8, 8, 0),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k_host": torch.randn(1, 2, 10, 8), "v_host": torch.randn(1, 2, 11, 8)}, "different numbers of keys"),
        ({"k_host": torch.randn(1, 1, 10, 8), "v_host": torch.randn(1, 1, 10, 8)}, "differ in more than the key axis"),
        ({"k_dev": None}, "both be given or both be None"),
        ({"strategy": "gpu"}, "expected one of auto, host, stream"),
        ({"budget_bytes": -1}, ">= 0"),
        ({"mask": torch.zeros(1, 1, 1, 7, dtype=torch.bool)}, "does not broadcast"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    args = dict(q=torch.randn(1, 4, 3, 8), k_dev=torch.randn(1, 2, 5, 8), v_dev=torch.randn(1, 2, 5, 8),
                k_host=torch.randn(1, 2, 10, 8), v_host=torch.randn(1, 2, 10, 8), strategy="auto", budget_bytes=0, mask=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        cooperative_attention(args.pop("q"), args.pop("k_dev"), args.pop("v_dev"), args.pop("k_host"), args.pop("v_host"), **args)


# --- the worker thread --------------------------------------------------------------------------


def test_host_share_runs_on_the_worker_concurrently_with_the_device_share(monkeypatch):
    """The host share waits for the device share to start: a sequential implementation deadlocks."""
    q, k, v, kw = _case(1, 4, 2, 3, 40, 8, masks="causal")
    device_started = threading.Event()
    threads = {}
    real_host, real_share = cooperative._host_partial, cooperative._share_partial

    def host(*args):
        threads["host"] = threading.current_thread().name
        assert device_started.wait(timeout=20), "the device share did not start while the host share ran"
        return real_host(*args)

    def device(*args):
        threads["device"] = threading.current_thread().name
        device_started.set()
        return real_share(*args)

    monkeypatch.setattr(cooperative, "_host_partial", host)
    monkeypatch.setattr(cooperative, "_share_partial", device)
    out = cooperative_attention(q, *_split(k, v, 25, True), strategy="host", **kw)
    _check(out, q, k, v, kw)
    assert threads["device"] == threading.current_thread().name
    assert threads["host"].startswith("fa_dynamo-host") and threads["host"] != threads["device"]


def test_worker_failure_surfaces_in_the_caller(monkeypatch):
    q, k, v, kw = _case(1, 4, 2, 3, 40, 8, masks="causal")

    def broken(*args):
        raise MemoryError("host kernel ran out of memory")

    monkeypatch.setattr(cooperative, "_host_partial", broken)
    with pytest.raises(RuntimeError, match="failed on the worker thread: MemoryError: host kernel ran out") as info:
        cooperative_attention(q, *_split(k, v, 25, True), strategy="host", **kw)
    assert isinstance(info.value.__cause__, MemoryError)
    monkeypatch.undo()  # the worker survives and serves the next call
    _check(cooperative_attention(q, *_split(k, v, 25, True), strategy="host", **kw), q, k, v, kw)


def test_device_failure_waits_for_the_worker(monkeypatch):
    """A failing device share raises only after the worker let go of the tensors."""
    q, k, v, kw = _case(1, 4, 2, 3, 40, 8, masks="causal")
    host_done = threading.Event()
    real_host = cooperative._host_partial

    def slow_host(*args):
        out = real_host(*args)
        host_done.set()
        return out

    def broken(*args):
        raise RuntimeError("device kernel failed")

    monkeypatch.setattr(cooperative, "_host_partial", slow_host)
    monkeypatch.setattr(cooperative, "_share_partial", broken)
    with pytest.raises(RuntimeError, match="device kernel failed"):
        cooperative_attention(q, *_split(k, v, 25, True), strategy="host", **kw)
    assert host_done.is_set()


# --- staging memory, measured -------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by the ops run under it (views and in-place results of
    existing storages are not new memory; ops run *inside* another op are not seen)."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {key: (ref, n) for key, (ref, n) in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _stream_peak(host_keys: int, stage_keys: int) -> tuple[int, int, int]:
    q, k, v, kw = _case(1, 8, 2, 2, host_keys + 16, 64, masks="causal")
    per_key = _per_key(k, v)
    params = cooperative._Params(AttentionParams(64 ** -0.5, band=Band(None, kw["max_offset"])), "cpu")
    k_dev, v_dev, k_host, v_host = _split(k, v, host_keys, True)
    with LiveBytes() as mode:
        out, lse = cooperative.run_cooperative(q, k_dev, v_dev, k_host, v_host, None, None, params, host_first=True,
                                               strategy="stream", stage_bytes=stage_keys * per_key)
    _check(out, q, k, v, kw)
    out_bytes = (out.numel() + lse.numel()) * 4
    return mode.peak, stage_keys * per_key, out_bytes


def test_staging_stays_within_its_bound():
    """Peak memory created while streaming 4096 and 16384 host keys through 128-key blocks:
    two pinned-host slots and two device slots of one block (K and V) each, plus a few
    output-sized merge temporaries — independent of the host share's length."""
    peaks = []
    for host_keys in (4096, 16384):
        peak, block_bytes, out_bytes = _stream_peak(host_keys, stage_keys=128)
        bound = 4 * block_bytes + 16 * out_bytes
        assert 4 * block_bytes <= peak <= bound, (host_keys, peak, bound)
        peaks.append(peak)
        kv_bytes = host_keys * block_bytes // 128
        assert peak < kv_bytes / 7, "the host share was gathered, not streamed"
    assert peaks[0] == peaks[1], peaks


# --- choosing the strategy ------------------------------------------------------------------------


def test_cost_model_picks_host_for_decode_and_stream_for_prefill():
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)

    k_host, v_host = meta(1, 8, 200_000, 128), meta(1, 8, 200_000, 128)  # 800 MB of fp16 KV on the host
    server = CostModel(host_gflops=800.0, host_mem_gbps=100.0, link_gbps=25.0, device_gflops=300_000.0)
    assert choose_strategy(meta(1, 32, 1, 128), k_host, v_host, 50_000, server) == "host"  # decode: bandwidth-bound
    assert choose_strategy(meta(1, 32, 4096, 128), k_host, v_host, 50_000, server) == "stream"  # prefill: FLOP-bound
    laptop = CostModel(host_gflops=50.0, host_mem_gbps=20.0, link_gbps=25.0)
    assert choose_strategy(meta(1, 32, 1, 128), k_host, v_host, 50_000, laptop) == "stream"
    assert choose_strategy(torch.randn(1, 4, 512, 8), torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8), 3) == "host"


def test_overrides_force_the_strategy(monkeypatch):
    q, k, v, kw = _case(1, 4, 2, 3, 40, 8, masks="causal")
    calls = []
    real = cooperative._stream
    monkeypatch.setattr(cooperative, "_stream", lambda *a: calls.append(a[-1]) or real(*a))
    cooperative_attention(q, *_split(k, v, 25, True), **kw)
    assert calls == []  # q on the CPU: auto picks the host cores
    with overrides(strategy="stream", stage_bytes=3 * _per_key(k, v)):
        out = cooperative_attention(q, *_split(k, v, 25, True), strategy="host", **kw)
    assert calls == [3 * _per_key(k, v)]
    _check(out, q, k, v, kw)
    with pytest.raises(ValueError, match="expected one of"):
        with overrides(strategy="fast"):
            pass
