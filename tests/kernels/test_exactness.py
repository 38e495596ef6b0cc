"""The exactness contract (``kernels/exactness.py``): NaN exactly where the reference has it, at a
cost proportional to what the kernel did not read.

The CPU paths trust ATen's flash kernel to propagate every NaN it reads — or, in a row whose every
score is NaN, to answer as for an empty row (zeros, lse 0), which ``aten_lse`` marks — and check
only the values (and, for keys cut by a ``-inf`` bias, the keys) it was not handed. The first two
tests pin that ATen behaviour, so a torch whose kernel changes fails here by name; the others put
one NaN in every kind of place, on every CPU path, and compare with float64 dense math. CI's CPU
may take other vector paths than this one: ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) runs
them here.
"""

from __future__ import annotations

import pytest
import torch

import fa_dynamo
from fa_dynamo.kernels import cpu, exactness
from tests.conftest import generator_for

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
NAN = float("nan")


@pytest.mark.parametrize("where", ["q", "visible key", "hidden key", "visible value", "hidden value", "dead row"])
@pytest.mark.parametrize("shape", [(4, 1024), (1, 3000), (300, 2000)])
def test_aten_flash_propagates_every_nan_it_reads(where, shape):
    sq, sk = shape
    g = torch.Generator().manual_seed(sq + sk)
    q = torch.randn(1, 2, sq, 64, generator=g)
    k, v = (torch.randn(1, 2, sk, 64, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, sq, sk)
    mask[..., sk // 2 : sk // 2 + 700] = float("-inf")
    if where == "dead row":
        mask[..., 0, :] = float("-inf")
    j = sk // 2 + 10 if "hidden" in where else 5
    target = {"q": (q, 0), "visible key": (k, j), "hidden key": (k, j)}.get(where, (v, j))
    target[0][0, 0, target[1], 3] = NAN
    out, _ = _flash_cpu(q, k, v, 0.0, False, attn_mask=mask)
    rows = out[0, 0].isnan().any(-1)
    assert rows[0] if where in ("q", "dead row") else rows.all(), f"ATen's flash kernel dropped a NaN in a {where}"


@pytest.mark.parametrize("where", ["q", "every key"])
@pytest.mark.parametrize("num_keys", [1, 4, 15, 33, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_aten_flash_answers_a_row_of_nan_scores_with_nan_or_lse_zero(where, num_keys, masked):
    """Short rows come back as zeros with lse 0 (the scalar max skips NaN), long ones as NaN."""
    g = torch.Generator().manual_seed(num_keys)
    q = torch.randn(1, 1, 3, 8, generator=g)
    k, v = (torch.randn(1, 1, num_keys, 8, generator=g) for _ in range(2))
    (q[0, 0, 1] if where == "q" else k[0, 0, :, 2]).fill_(NAN)
    mask = torch.zeros(1, 1, 3, num_keys)
    if masked:
        mask[..., num_keys // 2 + 1:] = float("-inf")
    out, lse = _flash_cpu(q, k, v, 0.0, False, attn_mask=mask if masked else None)
    row = out[0, 0, 1]
    assert row.isnan().any() or (lse[0, 0, 1] == 0 and (row == 0).all())
    assert bool(exactness.aten_lse(lse)[0, 0, 1].isnan()) or row.isnan().any()


def _reference(q, k, v, **kw):
    kw = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    return fa_dynamo.attention(q.double(), k.double(), v.double(), kernel="reference", **kw)


def _case(path: str, g: torch.Generator):
    """Inputs taking one CPU path: packed decode over a static cache, the whole-call causal
    path, the tiled path with a sliding window (tiles skipped), the tiled path with a dense
    mask hiding whole tiles."""
    if path == "packed":
        q = torch.randn(2, 8, 1, 16, generator=g)
        k, v = (torch.randn(2, 2, 600, 16, generator=g) for _ in range(2))
        mask = (torch.arange(600) >= 300).expand(2, 1, 1, 600).clone()  # unfilled slots
        return q, k, v, dict(mask=mask)
    q, k, v = (torch.randn(1, 2, 700, 16, generator=g) for _ in range(3))
    if path == "causal":
        return q, k, v, dict(max_offset=0)
    if path == "window":
        return q, k, v, dict(max_offset=0, min_offset=-100, block_q=128, block_k=128)
    mask = torch.zeros(1, 1, 700, 700, dtype=torch.bool)
    mask[..., 256:512] = True
    return q, k, v, dict(mask=mask, block_q=128, block_k=128)


@pytest.mark.parametrize("path", ["packed", "causal", "window", "dense mask"])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("key", [0, 5, 299, 300, 420, 599, 699])
def test_one_nan_anywhere_is_nan_exactly_where_eager_has_it(path, tensor, key):
    """A key hidden by a mask or a band (replaced scores) ignores its NaN; any NaN value, read or
    not, makes its heads' rows NaN (0 · NaN); a NaN query row is NaN."""
    g = generator_for(path, tensor, key)
    q, k, v, kw = _case(path, g)
    t = {"q": q, "k": k, "v": v}[tensor]
    index = min(key, t.shape[2] - 1)
    t[0, 0, index, 3] = NAN
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    ref = _reference(q, k, v, **kw)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["packed", "causal", "window", "dense mask"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("key", [5, 420, 699])
def test_an_infinite_value_anywhere_is_nan_exactly_where_eager_has_it(path, value, key):
    """``0 · inf`` is NaN: an infinite value behind a mask or outside the band, which the kernel
    never reads, makes its heads' rows NaN in eager, so it must in the op too; one a row sees
    makes it infinite."""
    g = generator_for(path, value, key)
    q, k, v, kw = _case(path, g)
    v[0, 1, min(key, v.shape[2] - 1), 3] = value
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    ref = _reference(q, k, v, **kw)
    assert not ref.isfinite().all()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["packed", "causal", "window", "dense mask"])
def test_an_infinite_key_behind_an_added_fill_is_nan_as_in_eager(path):
    """``fill_added``: the score at a hidden key of ``+inf`` is ``inf + fill``, +inf, and the
    row's softmax is NaN."""
    g = torch.Generator().manual_seed(13)
    q, k, v, kw = _case(path, g)
    kw = dict(kw, fill_added=True)
    key = 450 if path == "packed" else 600
    k[0, 1, key] = float("inf") * q[0, q.shape[1] - 1, 0].sign()  # q·k = +inf for row 0 of the last head
    k[0, 1, key, 1:] = 0.0
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    ref = _reference(q, k, v, **kw)
    assert ref[0, q.shape[1] - 1].isnan().any() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, equal_nan=True)


def test_a_nan_key_behind_a_minus_inf_bias_is_nan_as_in_eager():
    """A ``-inf`` bias adds, it does not replace: eager's score at a NaN key is NaN even where
    the bias hides it, though the packed path does not hand that key to ATen."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(2))
    bias = torch.zeros(1, 1, 1, 400)
    bias[..., 200:] = float("-inf")
    k[0, 1, 300, 0] = NAN
    out = fa_dynamo.attention(q, k, v, bias=bias, kernel="cpu")
    ref = _reference(q, k, v, bias=bias)
    assert ref[0, 4:].isnan().all() and not ref[0, :4].isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["packed", "causal", "window", "dense mask"])
def test_a_nan_key_behind_an_added_fill_is_nan_as_in_eager(path):
    """``fill_added`` (eager's additive mask): the score at a hidden NaN key is ``NaN + fill``,
    NaN, though no path hands that key to ATen."""
    g = torch.Generator().manual_seed(11)
    q, k, v, kw = _case(path, g)
    kw = dict(kw, fill_added=True)
    key = 450 if path == "packed" else 600  # unfilled cache slot / hidden by band or mask of row 0
    k[0, 1, key, 3] = NAN
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    ref = _reference(q, k, v, **kw)
    assert ref[0, q.shape[1] - 1].isnan().any() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, equal_nan=True)


def test_the_nan_check_reads_only_the_keys_the_kernel_did_not(monkeypatch):
    """Decode over a half-filled static cache: the check sums the unfilled values, not K or the
    filled values (which the kernel read, and whose NaN would show in its output)."""
    summed = []
    real = exactness.has_nonfinite
    monkeypatch.setattr(exactness, "has_nonfinite", lambda t: summed.append(None if t is None else t.shape) or real(t))
    g = torch.Generator().manual_seed(1)
    q, k, v, kw = _case("packed", g)
    fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    assert summed == [torch.Size([2, 2, 300, 16])]


@pytest.mark.parametrize("a, b, expected", [
    ([(0, 10)], [(2, 4), (6, 12)], [(2, 4), (6, 10)]),
    ([(0, 5), (7, 9)], [(4, 8)], [(4, 5), (7, 8)]),
    ([(0, 3)], [(3, 6)], []),
    ([], [(0, 4)], []),
])
def test_key_ranges_intersect(a, b, expected):
    assert cpu._intersect(a, b) == expected
    assert cpu._intersect(b, a) == expected


@pytest.mark.parametrize("ranges, expected", [
    ([(2, 4), (6, 10)], [(0, 2), (4, 6)]),
    ([(0, 10)], []),
    ([], [(0, 10)]),
    ([(0, 3), (8, 10)], [(3, 8)]),
])
def test_key_range_complement(ranges, expected):
    assert cpu._complement(ranges, 10) == expected


@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min])
def test_a_finite_fill_counts_where_the_row_saw_nothing_better(fill):
    """``fill_counts`` stays exact at ``|fill| ~ 1e38``, where ``lse ≈ fill + log(n)``."""
    lse = torch.tensor([fill + 3.0, 5.0, fill])
    assert exactness.fill_counts(lse, fill, 100).tolist() == [True, False, True]
