"""The xformers mapping (fa_dynamo/kernels/vendor/xformers.py) against a fake ``xformers``.

The fake's ``memory_efficient_attention`` / ``..._forward_requires_grad`` take exactly the
documented signature ``(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
output_dtype=None)``, check layouts (BMHK ``[B, M, H, K]`` or BMGHK ``[B, M, G, H, K]``), dtypes,
the dense bias's shape / dtype / 8-aligned row stride, and compute the documented semantics in
float64 (``softmax(scale·q·kᵀ + bias)``, the attn_bias classes materialized as xformers does).
The LSE comes back padded along Mq (to 32) and rows with nothing visible as zeros with a finite
LSE, so the mapping must slice and recompute them.
"""

from __future__ import annotations

import sys

import pytest
import torch

from fa_dynamo.kernels.vendor import xformers as xd
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.reference import reference_attention
from fa_dynamo.kernels.segments import Segments
from tests.kernels.fake_xformers import (
    LowerTriangularFromBottomRightLocalAttentionMask,
    LowerTriangularFromBottomRightMask,
    LowerTriangularMask,
)
from tests.kernels.test_ops import _case, _check_accuracy
from tests.kernels.test_segments import hidden_of, segment_ids


def _run(q, k, v, kw, scale, fill=float("-inf"), softcap=0.0):
    return xd.attention_xformers(
        q, k, v, kw.get("bias"), kw.get("mask"), AttentionParams(
            scale=scale, softcap=softcap, fill=fill, band=Band(kw.get("lo"), kw.get("hi")), block_q=16, block_k=16),
    )


F16, F32 = torch.float16, torch.float32
CASES = {
    # name: (shape (B, Hq, Hkv, Sq, Sk, D, Dv), band (lo, hi), masks, dtype, expected attn_bias)
    "no mask": ((2, 4, 4, 20, 20, 32, 32), (None, None), "none", F32, None),
    "causal top-left": ((1, 4, 4, 20, 30, 32, 32), (None, 0), "none", F32, LowerTriangularMask),
    "bottom-right Sq<Sk": ((1, 2, 2, 12, 40, 16, 16), (None, 28), "none", F16, LowerTriangularFromBottomRightMask),
    "window": ((1, 2, 2, 24, 24, 16, 16), (-7, 0), "none", F32, LowerTriangularFromBottomRightLocalAttentionMask),
    "window Sq<Sk": ((1, 2, 2, 10, 36, 16, 16), (-5, 26), "none", F32, LowerTriangularFromBottomRightLocalAttentionMask),
    "GQA causal": ((2, 8, 2, 20, 20, 32, 32), (None, 0), "none", F32, LowerTriangularMask),
    "GQA window": ((1, 6, 2, 18, 30, 16, 16), (-4, 12), "none", F16, LowerTriangularFromBottomRightLocalAttentionMask),
    "dense bias": ((2, 4, 2, 20, 27, 32, 32), (None, None), "bias", F32, torch.Tensor),
    "bool mask + causal": ((2, 4, 4, 20, 20, 16, 16), (None, 0), "mask", F32, torch.Tensor),
    "other band (dense)": ((1, 2, 2, 24, 24, 16, 16), (-12, -3), "none", F32, torch.Tensor),
    "rows with no key": ((1, 2, 2, 30, 10, 16, 16), (None, -20), "none", F32, LowerTriangularFromBottomRightMask),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mapping_and_results(fake_xformers, name):
    shape, (lo, hi), masks, dtype, expected = CASES[name]
    q, k, v, kw = _case(shape, dtype, masks, seed=3)
    kw.update({"lo": lo, "hi": hi} if lo is not None or hi is not None else {})
    scale = shape[5] ** -0.5
    out, lse = _run(q, k, v, kw, scale)
    call = fake_xformers[-1]
    bias = call["attn_bias"]
    assert (bias is None) if expected is None else isinstance(bias, expected)
    if expected is LowerTriangularFromBottomRightLocalAttentionMask:
        assert bias._window_size == shape[4] - shape[3] - lo + 1
    grouped = shape[1] != shape[2]
    assert call["query"].dim() == (5 if grouped else 4)
    if grouped:
        assert call["key"].stride(3) == 0 and call["value"].stride(3) == 0, "k/v expanded over the group"
    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.dtype == dtype
    _check_accuracy(out, q, k, v, kw, scale)
    # lse against float64 dense math
    bias64 = kw["bias"].double() if "bias" in kw else None
    _, ref_lse = reference_attention(q.double(), k.double(), v.double(), bias64, kw.get("mask"),
                                     AttentionParams(scale=scale, band=Band(lo, hi)))
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    tol = 1e-4 if dtype == F32 else 2e-2
    torch.testing.assert_close(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0), atol=tol, rtol=tol)


def test_finite_fill_rows_recomputed(fake_xformers):
    q, k, v, kw = _case((1, 2, 2, 16, 16, 16, 16), F32, "none", seed=1)
    kw.update(lo=-3, hi=0)
    out, _ = _run(q, k, v, kw, 0.25, fill=0.0)
    _check_accuracy(out, q, k, v, kw, 0.25, fill=0.0)


@pytest.mark.parametrize("what", ["softcap", "float64", "Dv != D"])
def test_not_served_returns_none(fake_xformers, what):
    shape = (1, 2, 2, 8, 8, 16, 8 if what == "Dv != D" else 16)
    q, k, v, kw = _case(shape, torch.float64 if what == "float64" else F32, "none")
    assert _run(q, k, v, kw, 0.25, softcap=5.0 if what == "softcap" else 0.0) is None
    assert not fake_xformers


def test_without_xformers_returns_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    q, k, v, kw = _case((1, 2, 2, 8, 8, 16, 16), F32, "none")
    assert _run(q, k, v, kw, 0.25) is None


def test_real_xformers():
    pytest.importorskip("xformers.ops")
    if not torch.cuda.is_available():
        pytest.skip("xformers' memory_efficient_attention needs CUDA")
    for shape, (lo, hi), masks in [
        ((2, 8, 2, 40, 64, 64, 64), (None, 24), "none"),
        ((1, 4, 4, 33, 33, 64, 64), (-8, 0), "none"),
        ((1, 4, 2, 20, 37, 64, 64), (None, None), "bias"),
        ((1, 4, 4, 20, 20, 64, 64), (None, 0), "none"),
    ]:
        q, k, v, kw = _case(shape, F16, masks, seed=5)
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        kw = {n: t.cuda() for n, t in kw.items()}
        if lo is not None or hi is not None:
            kw.update(lo=lo, hi=hi)
        out, lse = _run(q, k, v, kw, shape[5] ** -0.5)
        _check_accuracy(out.cpu(), q.cpu(), k.cpu(), v.cpu(), {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in kw.items()}, shape[5] ** -0.5)


def test_segments_reach_xformers_as_a_dense_bias(fake_xformers):
    """No BlockDiagonalMask mapping yet: segment ids are materialized by the shared fallback."""
    q, k, v, kw = _case((2, 4, 2, 20, 20, 16, 16), F32, "causal", seed=4)
    q_ids, k_ids = segment_ids("packed", 2, 20, 20, seed=6)
    out, _ = xd.attention_xformers(q, k, v, None, None, AttentionParams(
        scale=0.25, band=Band(None, kw["hi"]), block_q=16, block_k=16, segments=Segments(q_ids, k_ids)))
    assert isinstance(fake_xformers[-1]["attn_bias"], torch.Tensor)
    _check_accuracy(out, q, k, v, {**kw, "mask": hidden_of(q_ids, k_ids)}, 0.25)
