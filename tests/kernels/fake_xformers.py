"""A fake ``xformers`` module for tests without xformers (it has no CPU operator).

The fake's ``memory_efficient_attention`` / ``..._forward_requires_grad`` take exactly the
documented signature, check layouts, dtypes and the dense bias's alignment, and compute the
documented semantics in float64 (see ``tests/kernels/test_xformers.py``). The ``fake_xformers``
fixture (registered in ``tests/conftest.py``) installs it and returns the list of recorded calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import pytest
import torch


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
