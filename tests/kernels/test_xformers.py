"""The xformers mapping (fa_dynamo/kernels/xformers_dispatch.py) against a fake ``xformers``.

The fake's ``memory_efficient_attention`` / ``..._forward_requires_grad`` take exactly the
documented signature ``(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
output_dtype=None)``, check layouts (BMHK ``[B, M, H, K]`` or BMGHK ``[B, M, G, H, K]``), dtypes,
the dense bias's shape / dtype / 8-aligned row stride, and compute the documented semantics in
float64 (``softmax(scale·q·kᵀ + bias)``, the attn_bias classes materialized as xformers does).
The LSE comes back padded along Mq (to 32) and rows with nothing visible as zeros with a finite
LSE, so the mapping must slice and recompute them.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import pytest
import torch

from fa_dynamo.kernels import xformers_dispatch as xd
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.reference import reference_attention
from fa_dynamo.kernels.segments import Segments
from tests.kernels.test_ops import _case, _check_accuracy
from tests.kernels.test_segments import hidden_of, segment_ids


def _documented(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    pass


SIGNATURE = inspect.signature(_documented)


class LowerTriangularMask:
    def visible(self, nq, nk):
        return (torch.arange(nk)[None, :] - torch.arange(nq)[:, None]) <= 0


class LowerTriangularFromBottomRightMask:
    def visible(self, nq, nk):
        return (torch.arange(nk)[None, :] - torch.arange(nq)[:, None]) <= nk - nq


@dataclasses.dataclass
class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    _window_size: int

    def __post_init__(self):
        if self._window_size <= 0:
            raise ValueError(f"Expected `window_size > 0`, but window_size={self._window_size}")

    def visible(self, nq, nk):  # tril(shift) then triu(shift - window + 1), as xformers materializes it
        d = torch.arange(nk)[None, :] - torch.arange(nq)[:, None]
        return (d <= nk - nq) & (d >= nk - nq - self._window_size + 1)


def _make_fake():
    calls = []

    def forward(*args, **kwargs):
        a = SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        q, k, v, bias = a["query"], a["key"], a["value"], a["attn_bias"]
        assert a["p"] == 0.0 and a["op"] is None and a["output_dtype"] is None
        assert isinstance(a["scale"], float)
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert q.dim() == k.dim() == v.dim() and q.dim() in (4, 5), "BMHK or BMGHK"
        b, mq = q.shape[:2]
        mk = k.shape[1]
        assert k.shape[0] == v.shape[0] == b and v.shape[1] == mk
        assert k.shape[2:-1] == q.shape[2:-1] == v.shape[2:-1], "heads (and groups) must match"
        assert k.shape[-1] == q.shape[-1] == v.shape[-1]
        calls.append(dict(a))
        heads_shape = q.shape[2:-1]
        qf, kf, vf = (t.double().movedim(1, -2) for t in (q, k, v))  # [B, (G,) H, M, K]
        s = a["scale"] * (qf @ kf.transpose(-1, -2))
        if isinstance(bias, torch.Tensor):
            assert bias.dtype == q.dtype, "attn_bias dtype must match query"
            assert tuple(bias.shape) == (b, *heads_shape, mq, mk), f"bias {tuple(bias.shape)}"
            assert bias.stride(-2) % 8 == 0, "attn_bias rows must be 8-aligned"
            s = s + bias.double()
        elif bias is not None:
            assert type(bias) in (LowerTriangularMask, LowerTriangularFromBottomRightMask,
                                  LowerTriangularFromBottomRightLocalAttentionMask)
            s = s.masked_fill(~bias.visible(mq, mk), float("-inf"))
        dead = torch.isneginf(s).all(-1, keepdim=True)
        s = s.masked_fill(dead, 0.0)
        lse = torch.logsumexp(s, -1)
        out = (torch.softmax(s, -1) @ vf).masked_fill(dead, 0.0)
        pad = -(-mq // 32) * 32  # lse padded along Mq, as the cutlass kernel does
        lse = torch.cat([lse, torch.full((*lse.shape[:-1], pad - mq), 123.0, dtype=lse.dtype)], -1)
        return out.movedim(-2, 1).to(q.dtype), lse.float()

    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    for cls in (LowerTriangularMask, LowerTriangularFromBottomRightMask, LowerTriangularFromBottomRightLocalAttentionMask):
        setattr(attn_bias, cls.__name__, cls)
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.attn_bias = attn_bias
    fmha.memory_efficient_attention_forward_requires_grad = forward
    fmha.memory_efficient_attention = lambda *a, **kw: forward(*a, **kw)[0]
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    ops.memory_efficient_attention = fmha.memory_efficient_attention
    ops.memory_efficient_attention_forward_requires_grad = forward
    root = types.ModuleType("xformers")
    root.ops = ops
    return {"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": attn_bias}, calls


@pytest.fixture
def fake_xformers(monkeypatch):
    modules, calls = _make_fake()
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def _run(q, k, v, kw, scale, fill=float("-inf"), softcap=0.0):
    return xd.attention_xformers(
        q, k, v, kw.get("bias"), kw.get("mask"), scale=scale, softcap=softcap, fill=fill,
        band=Band(kw.get("lo"), kw.get("hi")), block_q=16, block_k=16,
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
                                     scale=scale, softcap=0.0, fill=float("-inf"), band=Band(lo, hi))
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
    out, _ = xd.attention_xformers(q, k, v, None, None, scale=0.25, softcap=0.0, fill=float("-inf"),
                                   band=Band(None, kw["hi"]), block_q=16, block_k=16, segments=Segments(q_ids, k_ids))
    assert isinstance(fake_xformers[-1]["attn_bias"], torch.Tensor)
    _check_accuracy(out, q, k, v, {**kw, "mask": hidden_of(q_ids, k_ids)}, 0.25)
