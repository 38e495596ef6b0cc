"""GQA packing (``kernels/gqa_packing.py``): decode-shaped calls read K/V once per group.

Each case is checked against float64 dense math, and the ATen call the packed path makes is
inspected: one call (to the C++ decode kernel, and to ATen's with it turned off), K/V heads (not
query heads) as its heads, K/V handed over as views of the inputs (no copy), and only the keys
some row can see.
"""

from __future__ import annotations

import pytest
import torch

import fa_dynamo
from fa_dynamo.kernels import gqa_packing
from fa_dynamo.kernels.decode_kernel import decode_kernel_available
from tests.conftest import generator_for

FINFO_MIN = torch.finfo(torch.float32).min


@pytest.fixture(params=["cpp", "aten"])
def packed_calls(request, monkeypatch):
    """The (q, k, v, additive mask) of every call the packed path makes to its primitive: the C++
    decode kernel, or ATen's flash kernel with the C++ kernel turned off."""
    calls = []
    if request.param == "cpp":
        assert decode_kernel_available(), "the C++ decode kernel did not build (see the fa_dynamo log)"
        real_cpp = gqa_packing.decode_attention

        def spy_cpp(q, k, v, additive, scale, splits):
            calls.append((q, k, v, additive))
            return real_cpp(q, k, v, additive, scale, splits)

        monkeypatch.setattr(gqa_packing, "decode_attention", spy_cpp)
    else:
        monkeypatch.setattr(gqa_packing, "decode_kernel_serves", lambda *args: False)
    real = gqa_packing._flash_cpu

    def spy(q, k, v, dropout, causal, *, attn_mask=None, scale=None):
        calls.append((q, k, v, attn_mask))
        return real(q, k, v, dropout, causal, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(gqa_packing, "_flash_cpu", spy)
    return calls


def _reference(q, k, v, **kw):
    kw = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    return fa_dynamo.attention(q.double(), k.double(), v.double(), kernel="reference", **kw)


def _mask(kind: str, g: torch.Generator, b: int, hq: int, sq: int, sk: int):
    if kind == "none":
        return None
    shape = {"keys": (b, 1, 1, sk), "rows": (b, 1, sq, sk), "heads": (b, hq, sq, sk)}[kind]
    return torch.rand(shape, generator=g) < 0.3


@pytest.mark.parametrize("shape", [(1, 32, 8, 1, 700), (2, 8, 2, 3, 130), (2, 4, 1, 5, 77), (1, 6, 3, 1, 1)])
@pytest.mark.parametrize("band", ["none", "causal", "window"])
@pytest.mark.parametrize("mask", ["none", "keys", "rows", "heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decode_equals_float64(shape, band, mask, dtype, packed_calls):
    b, hq, hkv, sq, sk = shape
    g = generator_for(shape, band, mask, dtype)
    q = torch.randn(b, hq, sq, 32, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, sk, 32, generator=g).to(dtype) for _ in range(2))
    kw = dict(mask=_mask(mask, g, b, hq, sq, sk), scale=0.3)
    if band != "none":  # bottom-right: query i sits at position Sk - Sq + i
        kw["max_offset"] = sk - sq
    if band == "window":
        kw["min_offset"] = sk - sq - 40
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    ref = _reference(q, k, v, **kw)
    assert torch.equal(out.isnan(), ref.isnan())
    eager = fa_dynamo.attention(q, k, v, kernel="reference", **kw)  # eager's math in the dtype: its rounding sets the bar
    eager_err = (eager.double() - ref).nan_to_num().abs().max()
    assert out.dtype == dtype
    assert (out.double() - ref).nan_to_num().abs().max() <= 4 * eager_err + 1e-6
    (packed_q, packed_k, packed_v, _), = packed_calls
    assert packed_q.shape[1] == hkv and packed_q.shape[2] == sq * hq // hkv, "query heads folded into rows"
    assert packed_k.untyped_storage().data_ptr() == k.untyped_storage().data_ptr(), "K was copied"
    assert packed_v.untyped_storage().data_ptr() == v.untyped_storage().data_ptr(), "V was copied"


@pytest.mark.parametrize("fill", [float("-inf"), FINFO_MIN])
def test_a_static_cache_reads_only_its_filled_slots(fill, packed_calls):
    """gpt-fast / transformers' static cache: a dense mask hides the slots past the filled length;
    those keys are never handed to the kernel, and rows that see nothing match eager too."""
    g = torch.Generator().manual_seed(3)
    slots, filled = 512, 200
    q = torch.randn(2, 8, 1, 32, generator=g)
    k, v = (torch.randn(2, 2, slots, 32, generator=g) for _ in range(2))
    hidden = torch.arange(slots) >= filled  # unfilled slots
    mask = hidden.expand(2, 1, 1, slots).clone()
    mask[1, :, :, 150:] = True  # the second sequence is shorter
    out = fa_dynamo.attention(q, k, v, mask=mask, fill=fill, kernel="cpu")
    ref = _reference(q, k, v, mask=mask, fill=fill)
    assert (out.double() - ref).abs().max() < 2e-6
    (_, packed_k, _, _), = packed_calls
    assert packed_k.shape[2] == filled


def test_a_bias_and_finite_fill_padding_row_is_exact(packed_calls):
    """A row the mask hides whole under a finite fill averages V (eager's softmax of equal scores)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 2, 32, generator=g)
    k, v = (torch.randn(1, 2, 64, 32, generator=g) for _ in range(2))
    bias = torch.randn(1, 4, 2, 64, generator=g)
    mask = torch.zeros(1, 1, 2, 64, dtype=torch.bool)
    mask[..., 1, :] = True
    out = fa_dynamo.attention(q, k, v, bias=bias, mask=mask, fill=FINFO_MIN, kernel="cpu")
    ref = _reference(q, k, v, bias=bias, mask=mask, fill=FINFO_MIN)
    assert (out.double() - ref).abs().max() < 2e-6
    assert torch.allclose(out[0, :, 1].double(), v.double().mean(2).repeat_interleave(2, 1)[0], atol=1e-6)


def test_nan_in_a_hidden_value_is_nan_as_in_eager(packed_calls):
    """Eager multiplies the 0 probabilities of hidden keys with V: a NaN there makes the row NaN."""
    q = torch.randn(1, 4, 1, 32)
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    v[0, 0, 30] = float("nan")
    out = fa_dynamo.attention(q, k, v, max_offset=20, kernel="cpu")  # key 30 is past the band
    ref = _reference(q, k, v, max_offset=20)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, :2].isnan().all()
    assert len(packed_calls) == 1


@pytest.mark.parametrize("case", ["no_groups", "long_chunk", "segments"])
def test_other_calls_take_the_tiled_path(case, packed_calls):
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 30, 32), torch.randn(1, 2, 30, 32)
    kw = {}
    if case == "no_groups":
        k, v = torch.randn(1, 4, 30, 32), torch.randn(1, 4, 30, 32)
    elif case == "long_chunk":
        q = torch.randn(1, 4, gqa_packing.PACK_MAX_ROWS, 32)
    else:
        kw = dict(q_segments=torch.zeros(1, 1, dtype=torch.long), k_segments=torch.zeros(1, 30, dtype=torch.long))
    out = fa_dynamo.attention(q, k, v, kernel="cpu", **kw)
    assert (out.double() - _reference(q, k, v, **kw)).abs().max() < 2e-6
    assert packed_calls == []
