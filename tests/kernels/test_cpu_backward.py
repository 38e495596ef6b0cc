"""The CPU flash backward (``kernels/cpu_backward.py``) against float64 autograd of dense math.

Every structure the forward tiles by (bands with offsets, windows, segment ids, ALiBi, key
padding, dense masks and biases, GQA) and every row the forward leaves to the reference (no
visible key, finite fills, NaN) is checked, and the ATen backward calls are counted, so a case
that silently fell back to the reference backward fails.
"""

from __future__ import annotations

import pytest
import torch

import fa_dynamo
from fa_dynamo.kernels import cpu_backward
from tests.conftest import generator_for

NAN = float("nan")


@pytest.fixture
def aten_backward_calls(monkeypatch):
    calls = []
    real = cpu_backward._flash_cpu_backward

    def spy(*args, **kwargs):
        calls.append(args[2].shape)  # the keys of the call
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_backward, "_flash_cpu_backward", spy)
    return calls


def _grads(q, k, v, grad, **kw):
    """``(out, dq, dk, dv)`` of the op with ``kw``; float64 inputs run the reference kernel."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    kernel = "reference" if q.dtype == torch.float64 else "cpu"
    out = fa_dynamo.attention(*leaves, kernel=kernel, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _float64(kw: dict) -> dict:
    return {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in kw.items()}


def _inputs(g, b=2, hq=4, hkv=2, sq=300, sk=300, d=16, dtype=torch.float32):
    q = torch.randn(b, hq, sq, d, generator=g)
    k, v = (torch.randn(b, hkv, sk, d, generator=g) for _ in range(2))
    grad = torch.randn(b, hq, sq, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype)


def _check(q, k, v, grad, kw, tol=2e-5):
    got = _grads(q, k, v, grad, **kw)
    want = _grads(q.double(), k.double(), v.double(), grad.double(), **_float64(kw))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a.isnan(), b.isnan()), name
        err = (a.double() - b).nan_to_num().abs().max().item()
        assert err < tol * max(1.0, b.nan_to_num().abs().max().item()), (name, err)


def _segments(b, s, g):
    ids = torch.sort(torch.randint(0, 4, (b, s), generator=g), dim=-1).values
    return ids


CASES = {
    "causal": lambda g, b, sq, sk: dict(max_offset=0),
    "unmasked": lambda g, b, sq, sk: {},
    "key padding": lambda g, b, sq, sk: dict(mask=(torch.arange(sk) >= sk - 37).expand(b, 1, 1, sk).clone()),
    "bottom-right causal": lambda g, b, sq, sk: dict(max_offset=sk - sq),
    "window": lambda g, b, sq, sk: dict(max_offset=0, min_offset=-70),
    "band with offsets": lambda g, b, sq, sk: dict(max_offset=20, min_offset=-90),
    "dense mask": lambda g, b, sq, sk: dict(mask=torch.rand(b, 1, sq, sk, generator=g) < 0.2),
    "dense bias": lambda g, b, sq, sk: dict(bias=torch.randn(b, 1, sq, sk, generator=g), max_offset=0),
    "segments": lambda g, b, sq, sk: dict(q_segments=_segments(b, sq, g), k_segments=_segments(b, sk, g)),
    "alibi": lambda g, b, sq, sk: dict(alibi_slopes=torch.rand(4, generator=g)[None], max_offset=0),
    "scale": lambda g, b, sq, sk: dict(scale=0.7, max_offset=0),
}


@pytest.mark.parametrize("case, shape", [(c, s) for c in CASES for s in ((300, 300), (200, 450))
                                         if c != "segments" or s[0] == s[1]])  # segment ids: Sq == Sk
def test_flash_backward_equals_float64(case, shape, aten_backward_calls):
    sq, sk = shape
    g = generator_for(case, shape)
    q, k, v, grad = _inputs(g, sq=sq, sk=sk)
    kw = dict(CASES[case](g, 2, sq, sk), block_q=128, block_k=128)
    _check(q, k, v, grad, kw)
    assert aten_backward_calls, "the reference backward ran instead"


@pytest.mark.parametrize("case", ["causal", "window", "dense mask"])
def test_bfloat16_gradients_are_within_bfloat16_rounding(case, aten_backward_calls):
    """ATen's kernel computes bfloat16 in float32 tiles: the gradients are the float64 ones to
    within a few bfloat16 ulps (2^-8 relative) of their largest entry."""
    g = torch.Generator().manual_seed(11)
    q, k, v, grad = _inputs(g, sq=256, sk=256, dtype=torch.bfloat16)
    kw = dict(CASES[case](g, 2, 256, 256), block_q=128, block_k=128)
    got = _grads(q, k, v, grad, **kw)
    want = _grads(q.double(), k.double(), v.double(), grad.double(), **_float64(kw))
    for a, b in zip(got[1:], want[1:]):
        assert (a.double() - b).abs().max() < 4 * 2**-8 * b.abs().max().item()
    assert aten_backward_calls


@pytest.mark.parametrize("fill", [float("-inf"), -1e4, torch.finfo(torch.float32).min])
def test_rows_the_forward_left_to_the_reference_have_its_gradients(fill, aten_backward_calls):
    """Rows with no visible key (NaN or a uniform average), and finite fills that count."""
    g = torch.Generator().manual_seed(3)
    q, k, v, grad = _inputs(g, sq=200, sk=200)
    mask = torch.rand(2, 1, 200, 200, generator=g) < 0.3
    mask[:, :, 7] = True  # row 7 sees nothing
    mask[1, :, 60] = True  # row 60 sees nothing in batch 1 only
    mask[1, :, 50, :190] = True  # row 50 of batch 1 sees 10 keys
    _check(q, k, v, grad, dict(mask=mask, fill=fill, block_q=64, block_k=64))
    assert aten_backward_calls


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_an_added_fill_passes_gradient_through_the_rows_it_hides_whole(kernel):
    """Eager's additive ``finfo.min`` mask (``fill_added``): a left-padded row that sees no key
    averages every value, and autograd still flows into q and k through the scores the fill
    absorbed; a written-over fill (``masked_fill``) passes none there."""
    g = torch.Generator().manual_seed(8)
    q, k, v, grad = _inputs(g, sq=120, sk=120)
    hidden = torch.ones(120, 120, dtype=torch.bool).triu(1).expand(2, 1, 120, 120).clone()
    hidden[1, ..., :20] = True  # batch 1 left-padded: its rows 0..19 see no key
    fill = torch.finfo(torch.float32).min
    leaves = [t.double().detach().requires_grad_() for t in (q, k, v)]
    eager_k, eager_v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in leaves[1:])
    scores = leaves[0] @ eager_k.transpose(-1, -2) * q.shape[-1] ** -0.5 + torch.where(hidden, fill, 0.0).double()
    want = torch.autograd.grad(torch.softmax(scores, -1) @ eager_v, leaves, grad.double())
    mask = torch.zeros(2, 1, 1, 120, dtype=torch.bool)
    mask[1, ..., :20] = True
    kw = dict(mask=mask, max_offset=0, fill=fill, kernel=kernel, block_q=64, block_k=64)
    leaves32 = [t.detach().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(fa_dynamo.attention(*leaves32, fill_added=True, **kw), leaves32, grad)
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-5 * b.abs().max().item()
    written_over = torch.autograd.grad(fa_dynamo.attention(*leaves32, **kw), leaves32, grad)
    assert written_over[0][1, :, :20].abs().max() == 0 < want[0][1, :, :20].abs().max()


def test_zero_empty_rows_have_zero_gradients():
    g = torch.Generator().manual_seed(4)
    q, k, v, grad = _inputs(g, sq=100, sk=100)
    mask = torch.zeros(2, 1, 100, 100, dtype=torch.bool)
    mask[..., 9, :] = True
    _check(q, k, v, grad, dict(mask=mask, zero_empty_rows=True, max_offset=0))


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_a_nan_input_gives_nan_gradients_where_eager_does(tensor):
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = _inputs(g, sq=150, sk=150)
    {"q": q, "k": k, "v": v}[tensor][0, 0, 40, 2] = NAN
    _check(q, k, v, grad, dict(max_offset=0, block_q=64, block_k=64))


def test_gradients_of_the_bias_and_slopes_still_come_from_the_reference(aten_backward_calls):
    g = torch.Generator().manual_seed(6)
    q, k, v, grad = _inputs(g, sq=64, sk=64)
    bias = torch.randn(2, 1, 64, 64, generator=g, requires_grad=True)
    out = fa_dynamo.attention(q, k, v, bias=bias, kernel="cpu")
    (dbias,) = torch.autograd.grad(out, (bias,), grad)
    ref_bias = bias.detach().double().requires_grad_()
    ref = fa_dynamo.attention(q.double(), k.double(), v.double(), bias=ref_bias, kernel="reference")
    (want,) = torch.autograd.grad(ref, (ref_bias,), grad.double())
    assert (dbias.double() - want).abs().max() < 1e-5
    assert not aten_backward_calls


def test_one_call_for_a_problem_the_forward_served_in_one(aten_backward_calls):
    g = torch.Generator().manual_seed(8)
    q, k, v, grad = _inputs(g, sq=700, sk=700)
    _check(q, k, v, grad, dict(max_offset=0, block_q=128, block_k=128))
    assert aten_backward_calls == [k.shape]


def test_empty_tiles_are_skipped(aten_backward_calls):
    """A 64-key window over 1024 keys: each 128-row query tile differentiates only the key runs it
    sees, not all 1024 keys."""
    g = torch.Generator().manual_seed(9)
    q, k, v, grad = _inputs(g, b=1, sq=1024, sk=1024)
    _check(q, k, v, grad, dict(max_offset=0, min_offset=-63, block_q=128, block_k=128))
    assert sum(shape[2] for shape in aten_backward_calls) <= 8 * 256
