"""Hand-written softmax spellings become one ``aten.softmax`` node; look-alikes stay as written."""

from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fa_dynamo.passes.attention.manual_softmax import canonicalize_manual_softmax
from tests.conftest import Compiled, assert_same_as_eager, count_softmax


def _amax(s):
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _max_values_detached(s):
    e = (s - s.max(-1, keepdim=True).values.detach()).exp()
    return e / torch.sum(e, 3, keepdim=True)


def _plain(s):
    e = s.exp()
    return e / e.sum(-1, keepdim=True)


def _reciprocal(s):
    e = torch.exp(s - torch.amax(s, -1, keepdim=True))
    return e * e.sum(-1, keepdim=True).reciprocal()


def _in_float32(s):
    x = s.float()
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).to(s.dtype)


SPELLINGS = [_amax, _max_values_detached, _plain, _reciprocal, _in_float32]


def _other_dim(s):  # normalized over the query dim: not a last-dim softmax
    e = torch.exp(s - s.amax(dim=-2, keepdim=True))
    return e / e.sum(dim=-2, keepdim=True)


def _exp_reused(s):  # e also feeds the output: rewriting would keep it alive and change nothing
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True) + e


def _sum_plus_one(s):  # a normalizer that is not the row sum: not a softmax
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / (e.sum(dim=-1, keepdim=True) + 1)


def _no_keepdim(s):  # sum without keepdim broadcast differently: not a row normalization
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1)[..., None, :] if s.shape[-2] == s.shape[-1] else e


LOOK_ALIKES = [_other_dim, _exp_reused, _sum_plus_one, _no_keepdim]


def _rewrite(fn, s):
    gm = make_fx(fn, pre_dispatch=True)(s)
    where = canonicalize_manual_softmax(gm)
    gm.recompile()
    return gm, where


@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spellings_become_softmax(fn, dtype):
    s = (torch.randn(2, 3, 5, 7) * 3).to(dtype)
    gm, where = _rewrite(fn, s)
    assert len(where) == 1 and count_softmax(gm) == 1
    assert not any(n.target is torch.ops.aten.exp.default for n in gm.graph.nodes)
    assert_same_as_eager(gm(s), fn(s))
    assert_same_as_eager(gm(s), torch.softmax(s.double(), -1).to(dtype))


@pytest.mark.parametrize("fn", LOOK_ALIKES, ids=lambda f: f.__name__.strip("_"))
def test_look_alikes_stay(fn):
    s = torch.randn(2, 3, 6, 6)
    gm, where = _rewrite(fn, s)
    assert where == [] and count_softmax(gm) == 0
    torch.testing.assert_close(gm(s), fn(s), rtol=0, atol=0)


def test_fully_masked_row_gives_nan_like_eager():
    s = torch.randn(1, 2, 4, 4)
    s[0, 1, 2] = float("-inf")
    gm, _ = _rewrite(_amax, s)
    assert_same_as_eager(gm(s), _amax(s))


@pytest.mark.parametrize("fn", SPELLINGS[:4], ids=lambda f: f.__name__.strip("_"))
def test_manual_softmax_attention_fuses(fn):
    def attention(q, k, v, mask):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        return fn(s) @ v

    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 11, 16), torch.randn(2, 4, 11, 16)
    mask = torch.zeros(9, 11).masked_fill(torch.rand(9, 11) < 0.3, float("-inf"))
    mask[:, 0] = 0.0  # every row sees a key
    compiled = Compiled(attention)
    out = compiled(q, k, v, mask)
    assert compiled.fused == 1, compiled.refused
    assert_same_as_eager(out, attention(q, k, v, mask))
