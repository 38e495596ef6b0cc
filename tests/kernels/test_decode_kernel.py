"""The C++ decode kernel (``kernels/csrc/decode_attention.cpp``) against float64 math.

Called directly: every head dim it is built for, 1 to 16 rows, additive masks broadcast over
batch, heads or rows, K/V as strided views of a larger cache, key chunks (split-K) from one to
more than there are keys; NaN, infinities and rows that see nothing as eager has them.
"""

from __future__ import annotations

import pytest
import torch

from fa_dynamo.kernels.decode_kernel import HEAD_DIMS, MAX_ROWS, decode_attention, decode_kernel_available
from tests.conftest import generator_for


@pytest.fixture(scope="module", autouse=True)
def built():
    assert decode_kernel_available(), "the C++ decode kernel did not build (see the fa_dynamo log)"


def _float64(q, k, v, additive, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if additive is not None:
        s = s + additive.double()
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _additive(kind: str, g: torch.Generator, b: int, h: int, r: int, n: int):
    shape = {"none": None, "keys": (b, 1, 1, n), "rows": (1, 1, r, n), "heads": (b, h, r, n)}[kind]
    if shape is None:
        return None
    hidden = torch.rand(shape, generator=g) < 0.3
    return torch.randn(shape, generator=g).masked_fill(hidden, float("-inf"))


@pytest.mark.parametrize("dims", [(d, d) for d in HEAD_DIMS] + [(128, 64), (64, 256)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, MAX_ROWS])
def test_head_dims_and_rows_equal_float64(dims, rows):
    dim, dv = dims
    g = generator_for(dims, rows)
    q = torch.randn(2, 3, rows, dim, generator=g)
    k = torch.randn(2, 3, 333, dim, generator=g)
    v = torch.randn(2, 3, 333, dv, generator=g)
    out, lse = decode_attention(q, k, v, None, dim ** -0.5, 1)
    ref, ref_lse = _float64(q, k, v, None, dim ** -0.5)
    assert out.shape == (2, 3, rows, dv) and lse.shape == (2, 3, rows)
    assert (out.double() - ref).abs().max() < 2e-6
    assert (lse.double() - ref_lse).abs().max() < 2e-5


@pytest.mark.parametrize("mask", ["none", "keys", "rows", "heads"])
@pytest.mark.parametrize("splits", [1, 2, 5, 300])
@pytest.mark.parametrize("keys", [1, 63, 64, 200, 1000])
def test_masks_and_splits_over_cache_views_equal_float64(mask, splits, keys):
    """K/V are a slice of a ``[B, H, slots, D]`` cache (strided in batch and heads); more chunks
    than keys leaves chunks empty."""
    g = generator_for(mask, splits, keys)
    b, h, r, dim = 2, 2, 4, 64
    cache_k, cache_v = (torch.randn(b, h, keys + 37, dim, generator=g) for _ in range(2))
    k, v = cache_k[:, :, 5 : 5 + keys], cache_v[:, :, 5 : 5 + keys]
    q = torch.randn(b, h, r, dim, generator=g)
    additive = _additive(mask, g, b, h, r, keys)
    out, lse = decode_attention(q, k, v, additive, 0.2, splits)
    ref, ref_lse = _float64(q, k, v, additive, 0.2)
    seen = ~torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen), "a row that sees no key has lse -inf"
    assert (out.double() - ref).masked_fill(~seen[..., None], 0).abs().max() < 2e-6
    assert (lse.double() - ref_lse).masked_fill(~seen, 0).abs().max() < 2e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_bfloat16_cache_equals_float64_of_its_values(splits):
    """A bfloat16 cache is widened exactly; the math is float32, so the error is float32's, not
    bfloat16's (the output is rounded to bfloat16 once)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, n, 128, generator=g).bfloat16() for n in (4, 700, 700))
    additive = _additive("keys", g, 2, 4, 4, 700).bfloat16()
    out, lse = decode_attention(q, k, v, additive, 128 ** -0.5, splits)
    ref, ref_lse = _float64(q, k, v, additive, 128 ** -0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= ref.abs().max() * 2 ** -8  # one bfloat16 rounding
    assert (lse.double() - ref_lse).abs().max() < 2e-5


def test_large_scores_do_not_overflow():
    """Scores in the thousands: the running max keeps every exp() at most 1."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 4, 64, generator=g) * 30
    k, v = torch.randn(1, 1, 500, 64, generator=g) * 30, torch.randn(1, 1, 500, 64, generator=g)
    out, lse = decode_attention(q, k, v, None, 1.0, 3)
    ref, ref_lse = _float64(q, k, v, None, 1.0)
    assert lse.abs().max() > 1000
    assert (out.double() - ref).abs().max() < 1e-4 and ((lse.double() - ref_lse) / ref_lse).abs().max() < 1e-6


@pytest.mark.parametrize("splits", [1, 4])
def test_nan_and_inf_reach_the_rows_eager_gives_them_to(splits):
    """A NaN query row is NaN alone; a NaN or infinite value makes every row NaN, even at a key
    the mask hides (eager multiplies its 0 weight by it); an infinite key makes the rows NaN."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 4, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g)
    additive = torch.zeros(1, 1, 1, 300)
    additive[..., 250:] = float("-inf")
    cases = {"q": (q.clone(), k, v), "v": (q, k, v.clone()), "v_inf": (q, k, v.clone()), "k_inf": (q, k.clone(), v)}
    cases["q"][0][0, 0, 1, 3] = float("nan")
    cases["v"][2][0, 1, 270, 0] = float("nan")  # hidden by the mask
    cases["v_inf"][2][0, 1, 260, 5] = float("inf")  # hidden by the mask
    cases["k_inf"][1][0, 0, 10, 0] = float("inf")
    for name, (qi, ki, vi) in cases.items():
        out, lse = decode_attention(qi, ki, vi, additive, 0.3, splits)
        ref, ref_lse = _float64(qi, ki, vi, additive, 0.3)
        assert ref.isnan().any(), name
        assert torch.equal(out.isnan().any(-1), ref.isnan().any(-1)), name
        assert torch.equal(lse.isfinite(), ref_lse.isfinite()), name  # from the scores alone


def test_bad_input_is_refused_with_what_is_accepted():
    q, k = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 10, 64)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        decode_attention(q.double(), k.double(), k.double(), None, 1.0, 1)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        decode_attention(q, k.bfloat16(), k.bfloat16(), None, 1.0, 1)
    with pytest.raises(RuntimeError, match="head dims 32, 64"):
        decode_attention(torch.randn(1, 1, 4, 48), torch.randn(1, 1, 10, 48), torch.randn(1, 1, 10, 48), None, 1.0, 1)
    with pytest.raises(RuntimeError, match=f"1 to {MAX_ROWS} rows"):
        decode_attention(torch.randn(1, 1, MAX_ROWS + 1, 64), k, k, None, 1.0, 1)
    with pytest.raises(RuntimeError, match="contiguous in the head dim"):
        decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3)[..., :10, :], k, None, 1.0, 1)
    with pytest.raises(RuntimeError, match="splits must be >= 1"):
        decode_attention(q, k, k, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="additive float32"):
        decode_attention(q, k, k, torch.zeros(1, 1, 1, 10, dtype=torch.bool), 1.0, 1)
