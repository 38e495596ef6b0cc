"""``fa_dynamo.attention`` fuzzed directly against an independent float64 implementation.

``tests/kernels/test_ops.py`` covers the common cases (causal / window with the natural offsets,
one bias and one mask shape, softcap and decode once, four gradient cases). This file draws
what it does not: any band ``lo <= j - i <= hi`` (offsets far outside the matrix, ``lo > hi``,
bands that hide whole rows or everything), every fill kind (``-inf``, ``finfo.min``, small or
positive constants), bias and mask of every broadcast shape, additive masks of ``-inf`` or of huge finite values
(``finfo.min``, ``-1e9``) that hide whole rows, softcap combined with masks and
GQA, scale 0 or negative, Sq or Sk of 0 and 1, head dims 1..96 with ``Dv != D``,
non-contiguous inputs, NaN in an input row, odd tile sizes, float16; and gradients (q, k, v and bias) with masks,
GQA, softcap and finite fills together.

Accuracy is judged as in ``test_ops.py``: the op's error against float64 is at most 2x the error
of the same textbook attention run in the input dtype (3x for gradients), plus a floor; NaN
exactly where the float64 reference has NaN (rows with no visible key and a ``-inf`` fill).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

import fa_dynamo

KERNELS = ("cpu", "sdpa", "reference", "auto")
FILLS = (float("-inf"), torch.finfo(torch.float32).min, -5.0, 0.0, 3.0, -1e30)
FLOORS = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}
HEADS = ((1, 1), (2, 1), (4, 2), (6, 3), (4, 4), (3, 1), (8, 2))
HEAD_DIMS = (8, 1, 3, 13, 40, 64, 96)
# broadcast patterns of a bias / mask over [B, H, Sq, Sk]: True keeps the dim, False makes it 1
BROADCASTS = ((False, False, True, True), (False, False, False, True), (True, False, False, True),
              (True, True, True, True), (False, True, True, True), (True, False, True, False), (True, True, False, True))

EXAMPLES = max(settings.default.max_examples, 80)


def reference(q, k, v, *, bias=None, mask=None, scale, softcap=0.0, fill=float("-inf"), lo=None, hi=None,
              dtype=torch.float64):
    """Textbook attention in ``dtype`` (softmax in float32 for half types, as eager models do)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-2, -1)) * scale
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.to(s.dtype)
    diff = torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None]
    hidden = torch.zeros(diff.shape, dtype=torch.bool)
    if lo is not None:
        hidden |= diff < lo
    if hi is not None:
        hidden |= diff > hi
    if mask is not None:
        hidden = hidden | mask
    s = s.masked_fill(hidden, fill)
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


@st.composite
def problems(draw, grad=False):
    b = draw(st.integers(1, 2))
    hq, hkv = draw(st.sampled_from(HEADS))
    sq = draw(st.one_of(st.integers(1, 70), st.sampled_from([1, 0])))
    sk = draw(st.one_of(st.integers(1, 70), st.sampled_from([1, 0])))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS)))
    dtype = draw(st.sampled_from((torch.float32, torch.float64) if grad else
                                 (torch.float32, torch.bfloat16, torch.float64, torch.float16)))
    span = max(sq, sk) + 3
    offsets = st.one_of(st.none(), st.integers(-span, span), st.integers(-10 * span, 10 * span))
    lo, hi = draw(offsets), draw(offsets)
    fill = draw(st.sampled_from(FILLS))
    softcap = draw(st.sampled_from([0.0, 0.0, 1.0, 5.0, 30.0]))
    scale = draw(st.sampled_from([None, 0.3, 0.0, -0.5, 2.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    full = (b, hq, sq, sk)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = randn(b, hq, sq, d)
    if draw(st.booleans()):  # non-contiguous: q as a transposed view of [B, Sq, H, D] storage
        q = randn(b, sq, hq, d).transpose(1, 2)
    k, v = randn(b, hkv, sk, d), randn(b, hkv, sk, dv)
    bias = mask = None
    if draw(st.booleans()):
        keep = draw(st.sampled_from(BROADCASTS))
        shape = tuple(n if kept else 1 for n, kept in zip(full, keep))
        bias = randn(*shape)
        if draw(st.booleans()):  # an additive mask: -inf, or a finite value that swamps the scores
            value = draw(st.sampled_from([float("-inf"), torch.finfo(dtype).min] + ([-1e9] if dtype != torch.float16 else [])))
            density = draw(st.sampled_from([0.2, 0.9, 1.0]))  # 1.0: every key of every row
            bias = bias.masked_fill(torch.rand(shape, generator=g) < density, value)
            event(f"bias mask {value:g}")
    if draw(st.booleans()):
        keep = draw(st.sampled_from(BROADCASTS))
        shape = tuple(n if kept else 1 for n, kept in zip(full, keep))
        mask = torch.rand(shape, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.95, 1.0]))
    if draw(st.integers(0, 9)) == 0:  # a NaN in one row of q, k or v: eager propagates it
        which = draw(st.sampled_from(["q", "k", "v"]))
        t = {"q": q, "k": k, "v": v}[which]
        if t.shape[2] > 0:
            t[:, :, draw(st.integers(0, t.shape[2] - 1))] = float("nan")
            event(f"NaN in {which}")
    kernel = draw(st.sampled_from(KERNELS))
    block_q, block_k = draw(st.sampled_from([(256, 512), (1, 1), (3, 5), (16, 16), (7, 64), (64, 7)]))
    event(f"band {'none' if lo is None and hi is None else 'empty' if lo is not None and hi is not None and lo > hi else 'set'}")
    return dict(q=q, k=k, v=v, bias=bias, mask=mask, scale=scale, softcap=softcap, fill=fill,
                lo=lo, hi=hi, kernel=kernel, block_q=block_q, block_k=block_k)


def _call(p, **overrides):
    p = {**p, **overrides}
    return fa_dynamo.attention(
        p["q"], p["k"], p["v"], bias=p["bias"], mask=p["mask"], scale=p["scale"], softcap=p["softcap"],
        fill=p["fill"], min_offset=p["lo"], max_offset=p["hi"], kernel=p["kernel"],
        block_q=p["block_q"], block_k=p["block_k"],
    )


def _ref(p, dtype=torch.float64, **tensors):
    q, k, v, bias = (tensors.get(n, p[n]) for n in ("q", "k", "v", "bias"))
    scale = q.shape[-1] ** -0.5 if p["scale"] is None else p["scale"]
    return reference(q, k, v, bias=bias, mask=p["mask"], scale=scale, softcap=p["softcap"], fill=p["fill"],
                     lo=p["lo"], hi=p["hi"], dtype=dtype)


def _assert_accurate(ours, ref, same_dtype, floor, factor, what):
    assert torch.equal(ours.isnan(), ref.isnan()), (
        f"{what}: NaN at {int(ours.isnan().sum())} positions, the float64 reference at {int(ref.isnan().sum())}"
    )
    ok = ~ref.isnan()
    err = (ours.double() - ref).abs()[ok].max().item() if ok.any() else 0.0
    eager_err = (same_dtype.double() - ref).abs()[ok].nan_to_num().max().item() if ok.any() else 0.0
    scale = 1.0 + (ref.abs()[ok].max().item() if ok.any() else 0.0)
    assert err <= factor * eager_err + floor * scale, f"{what}: error {err:.3g}, eager's {eager_err:.3g}"


@settings(max_examples=EXAMPLES)
@given(p=problems())
@example(p=dict(  # one query, a band that hides every key, finite fill: uniform over V
    q=torch.randn(1, 4, 1, 8), k=torch.randn(1, 2, 9, 8), v=torch.randn(1, 2, 9, 8), bias=None, mask=None,
    scale=0.3, softcap=0.0, fill=-5.0, lo=3, hi=2, kernel="cpu", block_q=1, block_k=1))
def test_forward_matches_float64(p):
    out = _call(p)
    q = p["q"]
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], p["v"].shape[-1]) and out.dtype == q.dtype
    ref = _ref(p)
    same = _ref(p, dtype=q.dtype)
    _assert_accurate(out, ref, same, FLOORS[q.dtype], 2.0, "output")


@pytest.mark.parametrize("kernel", ["cpu", "sdpa"])
@pytest.mark.parametrize("band", [None, 0], ids=["no_band", "causal"])
def test_nan_query_row_propagates(kernel, band):
    """Found by the fuzzer: eager gives NaN for a query row containing NaN; ATen's CPU flash
    kernel (the cpu kernel's dense tiles, sdpa) returns a finite row instead."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 3, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g)
    q[0, 0, 1] = float("nan")
    p = dict(q=q, k=k, v=v, bias=None, mask=None, scale=0.3, softcap=0.0, fill=float("-inf"), lo=None, hi=band,
             kernel=kernel, block_q=256, block_k=512)
    _assert_accurate(_call(p), _ref(p), _ref(p, dtype=torch.float32), FLOORS[torch.float32], 2.0, "output")


@pytest.mark.parametrize("dv, softcap", [(16, 0.0), (8, 5.0)], ids=["dv_not_d", "softcap"])
@pytest.mark.parametrize("value", [torch.finfo(torch.float32).min, -1e9], ids=["finfo_min", "minus_1e9"])
def test_row_hidden_by_finite_bias(dv, softcap, value):
    """Found by the fuzzer: a row every key of which a huge finite bias hides is a uniform average
    in eager; the CPU kernel's GEMM tiles (Dv != D, softcap) normalise by a log-sum-exp that
    loses log(n) next to the bias, and the probabilities sum to n."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, dv, generator=g)
    bias = torch.tensor([0.0, value]).view(1, 1, 2, 1).expand(1, 1, 2, 5).contiguous()  # row 1: every key hidden
    p = dict(q=q, k=k, v=v, bias=bias, mask=None, scale=0.3, softcap=softcap, fill=float("-inf"), lo=None, hi=None,
             kernel="cpu", block_q=256, block_k=512)
    _assert_accurate(_call(p), _ref(p), _ref(p, dtype=torch.float32), FLOORS[torch.float32], 2.0, "output")


@settings(max_examples=EXAMPLES)
@given(p=problems(grad=True))
def test_gradients_match_float64(p):
    assume(p["q"].shape[2] > 0 and p["k"].shape[2] > 0)
    names = ["q", "k", "v"] + (["bias"] if p["bias"] is not None else [])
    leaves = {n: p[n].detach().clone().requires_grad_() for n in names}
    out = _call(p, **leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    ours = torch.autograd.grad(out, [leaves[n] for n in names], grad)
    ref_leaves = {n: p[n].detach().double().requires_grad_() for n in names}
    theirs = torch.autograd.grad(_ref(p, **ref_leaves), [ref_leaves[n] for n in names], grad.double(), allow_unused=True)
    same_leaves = {n: p[n].detach().clone().requires_grad_() for n in names}
    same = torch.autograd.grad(_ref(p, dtype=p["q"].dtype, **same_leaves), [same_leaves[n] for n in names], grad,
                               allow_unused=True)
    event("NaN gradients" if any(t.isnan().any() for t in theirs if t is not None) else "finite gradients")
    for n, a, r, e in zip(names, ours, theirs, same):
        r = torch.zeros_like(a, dtype=torch.float64) if r is None else r
        e = torch.zeros_like(a) if e is None else e
        assert a.shape == p[n].shape, f"d{n} has shape {tuple(a.shape)}, {n} {tuple(p[n].shape)}"
        _assert_accurate(a, r, e, FLOORS[a.dtype], 3.0, f"d{n}")


def test_reference_is_independent():
    """The float64 reference here is textbook math: a sanity check against SDPA."""
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference(q, k, v, scale=8 ** -0.5, hi=0), expected)
    assert math.isnan(reference(q, k, v, scale=1.0, lo=1, hi=0)[0, 0, 0, 0].item())
