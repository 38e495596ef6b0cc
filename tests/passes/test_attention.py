"""The attention pass: spellings that must fuse (compiled == eager, exact op counts), masks
that must be lifted (no Sq×Sk tensor left in the graph), and near-misses that must not fuse."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import Compiled, assert_same_as_eager
from fa_dynamo.passes.matching import op_arguments

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
    assert op_arguments(op)["bias"] is None and op_arguments(op)["mask"] is None, "the mask should be a band, not a tensor"
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


# --- autocast --------------------------------------------------------------------------------
# Eager under autocast runs Q·Kᵀ and P·V in the autocast dtype (scores + a float32 mask promote
# to float32); the op gets q, k, v cast the same way and returns eager's dtype.

def autocast_causal(q, k, v, m, dt):
    with torch.autocast("cpu", dtype=dt):
        s = q @ k.mT * 0.25
        n = s.shape[-1]
        return torch.softmax(s + torch.triu(torch.full((n, n), NEG_INF), 1), -1) @ v


def autocast_padding(q, k, v, m, dt):
    with torch.autocast("cpu", dtype=dt):
        return torch.softmax(q @ k.mT * 0.25 + m, -1) @ v


def autocast_gqa(q, k, v, m, dt):
    with torch.autocast("cpu", dtype=dt):
        n = q.shape[1] // k.shape[1]
        return torch.softmax(q @ _repeat_kv(k, n).mT * 0.25 + m, -1) @ _repeat_kv(v, n)


def autocast_disabled_inside(q, k, v, m, dt):
    with torch.autocast("cpu", dtype=dt):
        low = torch.softmax(q @ k.mT * 0.25 + m, -1) @ v
        with torch.autocast("cpu", enabled=False):
            full = torch.softmax(q @ k.mT * 0.25 + m, -1) @ v
    return low, full


def _assert_as_eager_under_autocast(actual, expected, reference):
    """Eager's dtype; within the low-precision tolerance of eager, and no further from the float64
    run than twice eager's own error (the op keeps the scores in float32: usually closer)."""
    assert actual.dtype == expected.dtype
    assert_same_as_eager(actual, expected)
    err, eager_err = ((t.double() - reference).abs().max().item() for t in (actual, expected))
    assert err <= 2 * eager_err + torch.finfo(expected.dtype).eps, (err, eager_err)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fn", [autocast_causal, autocast_padding, autocast_gqa, autocast_disabled_inside],
                         ids=lambda f: f.__name__)
def test_autocast_fuses_with_eager_dtypes(fn, dt):
    q, k, v = _qkv(h=8, hkv=2 if fn is autocast_gqa else 8, sq=29)
    m = torch.zeros(2, 1, 1, 29).masked_fill(torch.rand(2, 1, 1, 29) > 0.7, torch.finfo(torch.float32).min)
    compiled = Compiled(fn)
    outs, eager = compiled(q, k, v, m, dt), fn(q, k, v, m, dt)
    reference = fn(*(t.double() for t in (q, k, v, m)), dt)  # autocast leaves float64 alone
    pairs = zip(*(o if isinstance(o, tuple) else (o,) for o in (outs, eager, reference)))
    for actual, expected, ref in pairs:
        _assert_as_eager_under_autocast(actual, expected, ref)
    assert compiled.fused == (2 if fn is autocast_disabled_inside else 1), compiled.refused
    assert not compiled.refused
    if fn is autocast_disabled_inside:
        assert [o.dtype for o in outs] == [dt, torch.float32]


def test_autocast_region_that_cannot_be_rerun_is_refused_with_the_reason():
    """Eager's dtypes come from re-running the region on fake tensors; an op that cannot run
    there (here: its input carries no recorded value) leaves them unknown: refused, with why."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fa_dynamo.config import FastAttentionConfig
    from fa_dynamo.passes.attention.fuse import AttentionPass, AttentionReport

    q, k, v = _qkv(sq=7)
    m = torch.randn(2, 1, 1, 7)
    gm = make_fx(lambda *t: autocast_padding(*t, torch.bfloat16), tracing_mode="fake", pre_dispatch=True)(q, k, v, m)
    graph = gm.graph
    enter = next(n for n in graph.nodes if getattr(n.target, "__name__", "") == "_enter_autocast")
    with graph.inserting_before(enter):
        unknown = graph.call_function(operator.neg, (next(iter(graph.nodes)),))  # no meta["val"]
    with graph.inserting_after(enter):
        graph.call_function(aten.abs.default, (unknown,))
    report = AttentionReport("attention")
    AttentionPass().run(gm, FastAttentionConfig(), report)
    (_, why), = report.refused
    assert "could not be recomputed" in why and "abs" in why, why
    gm.recompile()
    assert_same_as_eager(gm(q, k, v, m), autocast_padding(q, k, v, m, torch.bfloat16))


# --- dynamic shapes, gradients, configuration -----------------------------------------------

def test_dynamic_sequence_length_fuses_once():
    compiled = Compiled(causal_triu_full, dynamic=True)
    for s in (17, 33, 50):
        q, k, v = _qkv(sq=s)
        assert_same_as_eager(compiled(q, k, v), causal_triu_full(q, k, v))
    assert len(compiled.backend.graphs) == 1 and compiled.fused == 1


def dynamic_3d_scores_viewed_to_4d(q, k, v):
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    s = torch.bmm(q.reshape(b * h, sq, d), k.reshape(b * h, sk, d).transpose(1, 2))
    s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1), NEG_INF)
    return s.softmax(-1).view(b, h, sq, sk) @ v


def scores_metadata_reads(q, k, v):
    s = q @ k.mT * 0.25
    keep = s.new_ones(s.size(-2), s.size(-1), dtype=torch.bool).tril(s.size(-1) - s.size(-2))
    p = torch.softmax(s.masked_fill(~keep, NEG_INF), dim=-1)
    return p @ v + p.new_zeros(p.size(-2), 1)


@pytest.mark.parametrize("fn", [dynamic_3d_scores_viewed_to_4d, scores_metadata_reads], ids=lambda f: f.__name__)
def test_dynamic_layouts_and_metadata_reads_leave_no_dense_scores(fn):
    """The op's output is reshaped with symbolic sizes read off live nodes, and size/dtype reads
    of the scores are pointed elsewhere: neither keeps Q·Kᵀ, softmax or P·V alive."""
    compiled = Compiled(fn, dynamic=True)
    for b, h, sq, sk in [(3, 2, 5, 7), (2, 4, 6, 9)]:
        q, k, v = _qkv(b=b, h=h, sq=sq, sk=sk)
        assert_same_as_eager(compiled(q, k, v), fn(q, k, v))
    assert compiled.fused == 1 and not compiled.refused, compiled.refused
    dense = (aten.matmul.default, aten.bmm.default, aten.softmax.int)
    assert not [n for _, after in compiled.backend.graphs for n in after.graph.nodes if n.target in dense]


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_size_read_off_the_scores_is_rerouted(tracing_mode):
    """``sym_size`` of the scores (which make_fx emits only for a size no earlier node has, so it
    is added by hand here) becomes an int or a ``sym_size`` of q/k, and Q·Kᵀ dies."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fa_dynamo.config import FastAttentionConfig
    from fa_dynamo.passes.attention.fuse import AttentionPass, AttentionReport

    gm = make_fx(matmul_div, tracing_mode=tracing_mode, pre_dispatch=True)(*_qkv(sq=7, sk=11))
    graph = gm.graph
    scores = next(n for n in graph.nodes if n.target is aten.matmul.default)
    pv = next(n for n in graph.nodes if n.target is aten.matmul.default and n is not scores)
    with graph.inserting_before(graph.output_node()):
        size = graph.call_function(aten.sym_size.int, (scores, 3))
        size.meta["val"] = scores.meta["val"].shape[3]
        plus = graph.call_function(aten.add.Tensor, (pv, size))
    pv.replace_all_uses_with(plus, delete_user_cb=lambda user: user is graph.output_node())
    report = AttentionReport("attention")
    AttentionPass().run(gm, FastAttentionConfig(), report)
    gm.recompile()
    assert report.fused and not report.refused, report.refused
    assert not [n for n in graph.nodes if n.target is aten.matmul.default]
    for sq, sk in [(7, 11)] + ([(5, 9)] if tracing_mode == "symbolic" else []):
        q, k, v = _qkv(sq=sq, sk=sk)
        assert_same_as_eager(gm(q, k, v), matmul_div(q, k, v) + sk)


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


# --- GPT-Neo: a finite fill, then an additive 0/finfo.min mask --------------------------------

MIN = torch.finfo(torch.float32).min


def _keep_left_padded(b, s, pad=7):
    """Key padding: row 1 has ``pad`` padding tokens on the left, so its first queries see no key."""
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, :pad] = False
    return keep


def _visible(sq, sk, window=None):
    i = torch.arange(sk - sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    return (j <= i) if window is None else (j <= i) & (j > i - window)


def gpt_neo_attn(q, k, v, buffer, keep, masked):
    """GPT-Neo's ``_attn``: fp32 scores without 1/√d, the layer's bool buffer (causal or local
    window) filled with finfo.min, then the model's additive causal+padding mask."""
    s = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2))
    ql, kl = q.size(-2), k.size(-2)
    causal = buffer[:, :, kl - ql:kl, :kl]
    s = torch.where(causal, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
    s = s + torch.where(_visible(ql, kl) & keep[:, None, None, :], 0.0, masked)
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


@pytest.mark.parametrize("window", [None, 8], ids=["global", "local"])
@pytest.mark.parametrize("masked", [MIN, NEG_INF], ids=["finfo_min", "neg_inf"])
@pytest.mark.parametrize("sq", [37, 1], ids=["prefill", "decode"])
def test_fill_then_absorbing_mask_fuses_with_fully_masked_rows(window, masked, sq):
    """Rows whose keys are all padding: eager averages the keys that hold one finfo.min (not
    the min + min = -inf ones), or gives NaN where everything is -inf; the op must match."""
    q, k, v = _qkv(sq=sq, sk=37)
    buffer = _visible(64, 64, window)[None, None]
    keep = _keep_left_padded(2, 37, pad=7 if sq > 1 else 37)
    compiled = Compiled(gpt_neo_attn)
    out, ref = compiled(q, k, v, buffer, keep, masked), gpt_neo_attn(q, k, v, buffer, keep, masked)
    assert_same_as_eager(out, ref)
    assert compiled.fused == 1, compiled.refused
    assert ref[1].isnan().any() == (masked == NEG_INF), "the test must reach fully masked rows"


def bf16_fill_then_mask(q, k, v, keep):  # bfloat16's own finfo.min: the bias is built in bfloat16
    s = q @ k.mT * 0.25
    low = torch.finfo(s.dtype).min
    s = s.masked_fill(~_visible(q.shape[-2], k.shape[-2]), low)
    return torch.softmax(s + torch.where(keep[:, None, None, :], 0.0, low).to(s.dtype), -1) @ v


def test_bfloat16_fill_then_absorbing_mask():
    q, k, v = _qkv(dtype=torch.bfloat16)
    keep = _keep_left_padded(2, 37)
    compiled = Compiled(bf16_fill_then_mask)
    assert_same_as_eager(compiled(q, k, v, keep), bf16_fill_then_mask(q, k, v, keep))
    assert compiled.fused == 1, compiled.refused


def finite_fill_then_bias(q, k, v):  # -1e4 does not absorb the scores: s + v is not v
    s = (q @ k.mT).masked_fill(~_visible(q.shape[-2], k.shape[-2]), -1e4)
    return torch.softmax(s + q.mean(-1, keepdim=True), -1) @ v


def bias_before_and_after_fill(q, k, v):  # eager replaces the first bias where it fills
    s = (q @ k.mT) + q.mean(-1, keepdim=True)
    s = s.masked_fill(~_visible(q.shape[-2], k.shape[-2]), MIN)
    return torch.softmax(s + k.mean(-1)[:, :, None, :], -1) @ v


# --- gpt-oss: attention sinks ---------------------------------------------------------------

def gpt_oss_attn(q, k, v, sinks, keep, masked, row_max="max"):
    """transformers' gpt-oss ``eager_attention_forward`` (GQA through repeat_kv)."""
    groups = q.shape[1] // k.shape[1]
    key, value = _repeat_kv(k, groups), _repeat_kv(v, groups)
    s = torch.matmul(q, key.transpose(2, 3)) * q.shape[-1] ** -0.5
    s = s + torch.where(_visible(q.shape[-2], k.shape[-2]) & keep[:, None, None, :], 0.0, masked)
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([s, column], dim=-1)
    if row_max == "max":
        combined = combined - combined.max(dim=-1, keepdim=True).values
    elif row_max == "amax":
        combined = combined - combined.amax(-1, keepdim=True)
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    return torch.matmul(probs[..., :-1].to(value.dtype), value)


@pytest.mark.parametrize("row_max", ["max", "amax", None])
@pytest.mark.parametrize("masked", [MIN, NEG_INF], ids=["finfo_min", "neg_inf"])
@pytest.mark.parametrize("sq", [37, 1], ids=["prefill", "decode"])
def test_attention_sinks_fuse_with_fully_masked_rows(row_max, masked, sq):
    """A row with no visible key gives 0 (the sink takes all the probability)."""
    q, k, v = _qkv(h=4, hkv=2, sq=sq, sk=37)
    sinks = torch.randn(4) * 2
    keep = _keep_left_padded(2, 37, pad=7 if sq > 1 else 37)
    compiled = Compiled(gpt_oss_attn)
    out, ref = compiled(q, k, v, sinks, keep, masked, row_max), gpt_oss_attn(q, k, v, sinks, keep, masked, row_max)
    assert_same_as_eager(out, ref)
    assert compiled.fused == 1, compiled.refused
    assert (ref[1, :, 0] == 0).all() and ref[0].abs().min() > 0, "the test must reach fully masked rows"


def test_attention_sinks_bfloat16():
    q, k, v = _qkv(h=4, hkv=2, dtype=torch.bfloat16)
    sinks, keep = torch.randn(4, dtype=torch.bfloat16), _keep_left_padded(2, 37)
    compiled = Compiled(gpt_oss_attn)
    assert_same_as_eager(compiled(q, k, v, sinks, keep, MIN), gpt_oss_attn(q, k, v, sinks, keep, MIN))
    assert compiled.fused == 1, compiled.refused


def row_max_subtracted(q, k, v):  # no sink: softmax ignores the per-row constant
    s = q @ k.mT * 0.25
    return torch.softmax(s - s.amax(-1, keepdim=True), -1) @ v


def test_row_max_subtraction_is_a_softmax_no_op():
    q, k, v = _qkv()
    compiled = Compiled(row_max_subtracted)
    assert_same_as_eager(compiled(q, k, v), row_max_subtracted(q, k, v))
    assert compiled.fused == 1, compiled.refused


def column_varying_along_queries(q, k, v):
    s = torch.cat([q @ k.mT, q[..., :1]], -1)
    return torch.softmax(s, -1)[..., :-1] @ v


def sink_probability_kept(q, k, v):
    s = torch.cat([q @ k.mT, torch.ones(1, 1, 1, 1).expand(*q.shape[:-1], 1)], -1)
    return torch.softmax(s, -1) @ torch.cat([v, v[:, :, :1]], -2)


def row_max_before_a_mask(q, k, v):  # the fill is not shifted by the row max: not a no-op
    s = q @ k.mT
    s = (s - s.amax(-1, keepdim=True)).masked_fill(~_visible(q.shape[-2], k.shape[-2]), -30.0)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize(
    "fn, reason",
    [(finite_fill_then_bias, "filled with a finite value"), (bias_before_and_after_fill, "before and after"),
     (column_varying_along_queries, "varies along the queries"), (sink_probability_kept, "reaches P·V"),
     (row_max_before_a_mask, "also used outside the attention")],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_survey_near_misses_stay_unfused_with_the_reason(fn, reason):
    q, k, v = _qkv()
    compiled = Compiled(fn)
    assert_same_as_eager(compiled(q, k, v), fn(q, k, v))
    assert compiled.fused == 0
    assert len(compiled.refused) == 1 and reason in compiled.refused[0][1], compiled.refused


# --- not attention: MoE routers; LongT5's dtype-only read of the scores ----------------------

def moe_router(h, w):
    probs = F.softmax(F.linear(h, w), dim=-1, dtype=torch.float)
    weights, experts = torch.topk(probs, 2, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def test_router_softmax_is_not_an_attention_site():
    h, w = torch.randn(2, 37, 64), torch.randn(8, 64)
    compiled = Compiled(moe_router)
    for a, b in zip(compiled(h, w), moe_router(h, w)):
        torch.testing.assert_close(a, b)
    sites = [s for reports in compiled.backend.reports for rep in reports if rep.name == "attention" for s in rep.sites]
    assert sites == []


def softmax_float_type_as(q, k, v):  # LongT5
    s = torch.matmul(q, k.transpose(3, 2))
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)


def test_dtype_only_read_of_the_scores_fuses():
    q, k, v = _qkv()
    compiled = Compiled(softmax_float_type_as)
    assert_same_as_eager(compiled(q, k, v), softmax_float_type_as(q, k, v))
    assert compiled.fused == 1, compiled.refused


def test_dtype_only_read_of_bfloat16_scores_is_as_accurate_as_eager():
    """Unscaled bfloat16 scores: eager rounds them before its float32 softmax, the op does not."""
    q, k, v = _qkv(dtype=torch.bfloat16)
    compiled = Compiled(softmax_float_type_as)
    out, ref = compiled(q, k, v), softmax_float_type_as(q, k, v)
    exact = softmax_float_type_as(q.double(), k.double(), v.double())
    assert compiled.fused == 1, compiled.refused
    assert out.dtype == ref.dtype
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max()


# --- held-out transformers families (tiny configs, random weights) -----------------------------

def _gpt_neo():  # alternating global / local (window) layers, no 1/√d scaling
    import transformers as T
    from tests.models import corpus as C
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(
        vocab_size=C.VOCAB, hidden_size=C.HIDDEN, num_layers=C.LAYERS, num_heads=C.HEADS,
        attention_types=[[["global", "local"], 1]], window_size=C.WINDOW, max_position_embeddings=128,
        attention_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0, initializer_range=C.INIT,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager"))


def _gpt_oss():  # attention sinks, sliding / full layers, GQA, an MoE router per layer
    import transformers as T
    from tests.models import corpus as C
    model = T.GptOssForCausalLM(T.GptOssConfig(
        vocab_size=C.VOCAB, hidden_size=C.HIDDEN, intermediate_size=2 * C.HIDDEN, num_hidden_layers=C.LAYERS,
        num_attention_heads=C.HEADS, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=C.WINDOW, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, attention_dropout=0.0, initializer_range=C.INIT,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that take a visible share of each row
    return model


@pytest.mark.parametrize("build", [_gpt_neo, _gpt_oss], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("case", ["pad_left", "decode_pad_left"])
def test_held_out_family_fuses_every_site(build, case):
    pytest.importorskip("transformers")
    from tests.models.corpus import LAYERS, Family, _decoder_case
    from tests.models.measure import measure_fastattention

    model = build().eval()
    m = measure_fastattention(_decoder_case(Family(build.__name__[1:], "decoder", build), model, case))
    assert m.fused == m.sites == LAYERS and not m.refused, m.refused
    assert_same_as_eager(m.actual, m.expected)  # padding positions included
