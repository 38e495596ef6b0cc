"""The attention pass: spellings that must fuse (compiled == eager, exact op counts), masks
that must be lifted (no Sq×Sk tensor left in the graph), and near-misses that must not fuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import Compiled, assert_same_as_eager

aten = torch.ops.aten
NEG_INF = float("-inf")


def _qkv(b=2, h=4, hkv=None, sq=37, sk=None, d=16, dtype=torch.float32):
    sk = sq if sk is None else sk
    hkv = h if hkv is None else hkv
    return (torch.randn(b, h, sq, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype),
            torch.randn(b, hkv, sk, d, dtype=dtype))


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


# --- spellings that must fuse -------------------------------------------------------------

def matmul_div(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1) @ v


def at_mul_on_q(q, k, v):
    return ((q * q.shape[-1] ** -0.5) @ k.mT).softmax(-1) @ v


def scale_on_k_and_q(q, k, v):
    return F.softmax((q * 0.5) @ (k.transpose(2, 3) * 0.25), dim=-1).matmul(v)


def no_scale_permute(q, k, v):
    return torch.softmax(q @ k.permute(0, 1, 3, 2), -1) @ v


def einsum_bhsd(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def einsum_bshd(q, k, v):  # q, k, v given as [B, H, S, D]; the einsums work in BSHD
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qs, ks) * 0.3
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vs).transpose(1, 2)


def bmm_3d(q, k, v):
    b, h, s, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    p = torch.bmm(q3, k3.transpose(1, 2)).mul(d ** -0.5).softmax(-1)
    return torch.bmm(p, v3).view(b, h, s, d)


def fp32_softmax_cast(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def eval_dropout(q, k, v):
    p = F.dropout(torch.softmax(q @ k.mT * 0.25, -1), p=0.1, training=False)
    return p @ v


SPELLINGS = [matmul_div, at_mul_on_q, scale_on_k_and_q, no_scale_permute, einsum_bhsd, einsum_bshd,
             bmm_3d, fp32_softmax_cast, eval_dropout]


@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__)
def test_spelling_fuses_and_matches_eager(fn):
    q, k, v = _qkv()
    compiled = Compiled(fn)
    assert_same_as_eager(compiled(q, k, v), fn(q, k, v))
    assert compiled.fused == 1, compiled.refused
    assert not compiled.refused


@pytest.mark.parametrize("fn", [matmul_div, einsum_bshd, fp32_softmax_cast], ids=lambda f: f.__name__)
def test_bfloat16(fn):
    q, k, v = _qkv(dtype=torch.bfloat16)
    compiled = Compiled(fn)
    assert_same_as_eager(compiled(q, k, v), fn(q, k, v))
    assert compiled.fused == 1


# --- masks ------------------------------------------------------------------------------

def causal_triu_full(q, k, v):
    s = q @ k.mT * 0.25
    sq, sk = s.shape[-2:]
    return torch.softmax(s + torch.triu(torch.full((sq, sk), NEG_INF), diagonal=1 + sk - sq), -1) @ v


def causal_tril_ones_masked_fill(q, k, v):
    s = q @ k.mT * 0.25
    sq, sk = s.shape[-2:]
    keep = torch.tril(torch.ones(sq, sk), diagonal=sk - sq)
    return s.masked_fill(keep == 0, NEG_INF).softmax(-1) @ v


def causal_arange_where_finfo_min(q, k, v):
    s = q @ k.mT * 0.25
    sq, sk = s.shape[-2:]
    i = torch.arange(sk - sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    return torch.where(j <= i, s, torch.finfo(s.dtype).min).softmax(-1) @ v


def top_left_causal_bool(q, k, v):
    s = q @ k.mT * 0.25
    sq, sk = s.shape[-2:]
    hidden = torch.ones(sq, sk, dtype=torch.bool).triu(1)
    return s.masked_fill(hidden, NEG_INF).softmax(-1) @ v


def sliding_window(q, k, v):
    s = q @ k.mT * 0.25
    sq, sk = s.shape[-2:]
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    visible = (j <= i) & (j > i - 8)
    return s.masked_fill(~visible, NEG_INF).softmax(-1) @ v


MASKS = [causal_triu_full, causal_tril_ones_masked_fill, causal_arange_where_finfo_min, top_left_causal_bool,
         sliding_window]


@pytest.mark.parametrize("sq, sk", [(37, 37), (5, 37), (1, 37), (40, 23)])
@pytest.mark.parametrize("fn", MASKS, ids=lambda f: f.__name__)
def test_in_graph_mask_is_lifted_to_a_band(fn, sq, sk):
    q, k, v = _qkv(sq=sq, sk=sk)
    compiled = Compiled(fn)
    assert_same_as_eager(compiled(q, k, v), fn(q, k, v))  # includes NaN rows when Sq > Sk
    assert compiled.fused == 1
    (_, after), = compiled.backend.graphs
    op = next(n for n in after.graph.nodes if n.target is torch.ops.fa_dynamo.attention.default)
    assert op.args[3] is None and op.args[4] is None, "the mask should be a band, not a tensor"
    big = [n for n in after.graph.nodes if "val" in n.meta and isinstance(n.meta["val"], torch.Tensor)
           and n.meta["val"].numel() >= sq * sk and n.op == "call_function" and n.target is not op.target
           and n.meta["val"].shape[-2:] == (sq, sk)]
    assert not big, f"an Sq×Sk tensor survives: {[n.name for n in big]}"


def dense_additive_mask(q, k, v, m):
    return torch.softmax(q @ k.mT * 0.25 + m, -1) @ v


def dense_bool_mask(q, k, v, keep):
    return torch.softmax((q @ k.mT * 0.25).masked_fill(~keep, NEG_INF), -1) @ v


def dense_where_and_causal(q, k, v, keep):
    s = q @ k.mT * 0.25
    n = s.shape[-1]
    s = s + torch.triu(torch.full((n, n), NEG_INF), 1)
    return torch.where(keep, s, NEG_INF).softmax(-1) @ v


def test_dense_masks_pass_through():
    q, k, v = _qkv()
    m = torch.randn(2, 1, 37, 37).masked_fill(torch.rand(2, 1, 37, 37) > 0.7, NEG_INF)
    keep = torch.rand(2, 1, 1, 37) > 0.3
    keep[1, ..., :] = False  # a batch whose every key is padded: NaN rows, as eager
    for fn, mask in [(dense_additive_mask, m), (dense_bool_mask, keep), (dense_where_and_causal, keep)]:
        compiled = Compiled(fn)
        assert_same_as_eager(compiled(q, k, v, mask), fn(q, k, v, mask))
        assert compiled.fused == 1, (fn.__name__, compiled.refused)


def softcap_gemma2(q, k, v):
    s = q @ k.mT * 0.25
    s = torch.tanh(s / 5.0) * 5.0
    n = s.shape[-1]
    return torch.softmax(s + torch.triu(torch.full((n, n), NEG_INF), 1), -1) @ v


def test_softcap():
    q, k, v = _qkv()
    compiled = Compiled(softcap_gemma2)
    assert_same_as_eager(compiled(q, k, v), softcap_gemma2(q, k, v))
    assert compiled.fused == 1


# --- GQA ----------------------------------------------------------------------------------

def gqa_repeat_kv(q, k, v):
    n = q.shape[1] // k.shape[1]
    return torch.softmax(q @ _repeat_kv(k, n).mT * 0.25, -1) @ _repeat_kv(v, n)


def gqa_repeat_interleave(q, k, v):
    n = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    return torch.softmax(q @ kr.transpose(-2, -1) * 0.25, -1) @ vr


@pytest.mark.parametrize("fn", [gqa_repeat_kv, gqa_repeat_interleave], ids=lambda f: f.__name__)
def test_gqa_reaches_the_op_without_copies(fn):
    q, k, v = _qkv(h=8, hkv=2)
    compiled = Compiled(fn)
    assert_same_as_eager(compiled(q, k, v), fn(q, k, v))
    (_, after), = compiled.backend.graphs
    op = next(n for n in after.graph.nodes if n.target is torch.ops.fa_dynamo.attention.default)
    assert op.args[1].meta["val"].shape[1] == 2 and op.args[2].meta["val"].shape[1] == 2
    assert not [n for n in after.graph.nodes if n.target in (aten.expand.default, aten.repeat_interleave.self_int)]


# --- dynamic shapes, gradients, configuration -----------------------------------------------

def test_dynamic_sequence_length_fuses_once():
    compiled = Compiled(causal_triu_full, dynamic=True)
    for s in (17, 33, 50):
        q, k, v = _qkv(sq=s)
        assert_same_as_eager(compiled(q, k, v), causal_triu_full(q, k, v))
    assert len(compiled.backend.graphs) == 1 and compiled.fused == 1


def test_gradients_through_the_fused_op():
    q, k, v = (t.requires_grad_() for t in _qkv(h=8, hkv=2))
    compiled = Compiled(lambda q, k, v: gqa_repeat_kv(q, k, v).sum(dim=-1).pow(2).sum())
    compiled(q, k, v).backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    gqa_repeat_kv(q, k, v).sum(dim=-1).pow(2).sum().backward()
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert compiled.fused == 1


def test_inner_inductor():
    q, k, v = _qkv()
    compiled = Compiled(causal_triu_full, options={"inner": "inductor"})
    assert_same_as_eager(compiled(q, k, v), causal_triu_full(q, k, v))
    assert compiled.fused == 1


@pytest.mark.parametrize("options", [{"attention": False}, {"disable": True}])
def test_switches_leave_the_graph_unfused(options):
    q, k, v = _qkv()
    compiled = Compiled(causal_triu_full, options=options)
    assert_same_as_eager(compiled(q, k, v), causal_triu_full(q, k, v))
    assert compiled.fused == 0


# --- near-misses: must stay unfused and still equal eager ----------------------------------

def softmax_other_dim(q, k, v):
    return torch.softmax(q @ k.mT, dim=-2) @ v


def probs_returned(q, k, v):
    p = torch.softmax(q @ k.mT, dim=-1)
    return p @ v, p


def transform_after_softmax(q, k, v):
    return (torch.softmax(q @ k.mT, dim=-1) * 2.0) @ v


def per_head_scale_tensor(q, k, v):
    return torch.softmax(q @ k.mT * torch.linspace(0.1, 1.0, q.shape[1])[:, None, None], -1) @ v


def permute_not_transpose(q, k, v):  # swaps heads and sequence: not K transposed
    kp = k.permute(0, 2, 1, 3)[:, :, : q.shape[1]].transpose(-1, -2)
    return torch.softmax(q @ kp[..., : q.shape[-2]].transpose(-1, -2).transpose(-1, -2), -1) @ v[:, :, : q.shape[-2]]


def scale_after_mask_then_more(q, k, v):
    s = (q @ k.mT).masked_fill(torch.rand(()) > 2, -10.0)  # finite fill
    return torch.softmax(s + torch.randn(()).abs(), -1) @ v


def training_dropout(q, k, v):
    return F.dropout(torch.softmax(q @ k.mT, -1), p=0.5, training=True) @ v


@pytest.mark.parametrize(
    "fn", [softmax_other_dim, probs_returned, transform_after_softmax, per_head_scale_tensor],
    ids=lambda f: f.__name__,
)
def test_near_miss_stays_unfused(fn):
    q, k, v = _qkv()
    compiled = Compiled(fn)
    out, ref = compiled(q, k, v), fn(q, k, v)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert_same_as_eager(a, b)
    assert compiled.fused == 0
    assert compiled.refused, "a near-miss should be reported with its reason"


def test_training_dropout_stays_unfused():
    q, k, v = _qkv()
    compiled = Compiled(training_dropout)
    assert compiled(q, k, v).shape == q.shape
    assert compiled.fused == 0 and "dropout" in compiled.refused[0][1]


def test_permute_that_is_not_a_transpose_is_exact():
    q, k, v = _qkv(h=4, sq=4, sk=4)
    compiled = Compiled(permute_not_transpose)
    assert_same_as_eager(compiled(q, k, v), permute_not_transpose(q, k, v))
