"""Split-K on CPU (``kernels/split_keys.py``): a decode problem's keys cut into chunks, handed to
ATen as one call over views of the cache, merged by log-sum-exp; checked against float64."""

from __future__ import annotations

import pytest
import torch

import fa_dynamo
from fa_dynamo.kernels import gqa_packing, split_keys
from tests.conftest import generator_for

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@pytest.mark.parametrize("problems, keys, threads, expected", [
    (8, 32768, 2, 1),     # 8 K/V heads keep 2 threads busy
    (1, 32768, 2, 4),     # MQA on 2 threads: two chunks per thread
    (2, 32768, 16, 16),   # 2 problems on 16 threads
    (1, 3000, 16, 2),     # chunks of at least SPLIT_MIN_KEYS
    (1, 1000, 16, 1),
])
def test_split_rule(problems, keys, threads, expected):
    assert split_keys.key_splits(problems, keys, threads) == expected


def _float64(q, k, v, additive, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if additive is not None:
        s = s + additive.double()
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("mask", ["none", "keys", "rows", "heads", "dead chunk", "dead row"])
@pytest.mark.parametrize("shape", [(1, 1, 4, 3001), (2, 2, 8, 2048), (3, 1, 1, 1500)])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_equals_float64(shape, mask, splits):
    b, h, r, length = shape
    g = generator_for(shape, mask, splits)
    cache_k, cache_v = (torch.randn(b, h, length + 50, 32, generator=g) for _ in range(2))
    k, v = cache_k[:, :, 20 : 20 + length], cache_v[:, :, 20 : 20 + length]  # views into a cache
    q = torch.randn(b, h, r, 32, generator=g)
    additive = None
    if mask != "none":
        shape4 = {"keys": (b, 1, 1, length), "rows": (b, 1, r, length)}.get(mask, (b, h, r, length))
        additive = torch.randn(shape4, generator=g).masked_fill(torch.rand(shape4, generator=g) < 0.3, float("-inf"))
        if mask == "dead chunk":
            additive[..., : length // splits] = float("-inf")
        if mask == "dead row":
            additive[0, 0, 0] = float("-inf")
    out, lse = split_keys.split_key_attention(q, k, v, additive, 0.2, splits)
    ref_out, ref_lse = _float64(q, k, v, additive, 0.2)
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead)
    assert (out.double() - ref_out)[~dead].abs().max() < 2e-6
    assert (lse.double() - ref_lse)[~dead].abs().max() < 2e-5


def test_a_nan_value_in_any_chunk_reaches_every_row():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 16, generator=g)
    k, v = (torch.randn(1, 1, 4000, 16, generator=g) for _ in range(2))
    additive = torch.zeros(1, 1, 1, 4000)
    additive[..., 1000:2000] = float("-inf")  # the NaN's chunk is hidden whole
    v[0, 0, 1500, 2] = float("nan")
    out, _ = split_keys.split_key_attention(q, k, v, additive, 0.25, 4)
    assert out[..., 2].isnan().all() and not out[..., 3].isnan().any()


def test_a_layout_without_mergeable_heads_is_declined():
    """Batch and heads cannot be one dim of a cache laid out ``[H, B, L, D]``: the caller runs
    the unsplit call instead."""
    k = torch.randn(2, 3, 2048, 16).transpose(0, 1)
    q = torch.randn(3, 2, 4, 16)
    assert split_keys.split_key_attention(q, k, k, None, 0.25, 2) is None


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("primitive", ["cpp", "aten"])
def test_mqa_decode_is_split_and_exact(primitive, four_threads, monkeypatch):
    """An MQA decode step over a half-filled static cache through the op: split (by the C++
    decode kernel, or over ATen's with it turned off), views only."""
    calls = []
    name = "decode_attention" if primitive == "cpp" else "split_key_attention"
    real = getattr(gqa_packing, name)

    def spy(q, k, v, additive, scale, splits):
        calls.append((k, splits))
        return real(q, k, v, additive, scale, splits)

    monkeypatch.setattr(gqa_packing, name, spy)
    if primitive == "aten":
        monkeypatch.setattr(gqa_packing, "decode_kernel_serves", lambda *args: False)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 1, 32, generator=g)
    k, v = (torch.randn(1, 1, 8192, 32, generator=g) for _ in range(2))
    mask = (torch.arange(8192) >= 5000).expand(1, 1, 1, 8192)
    out = fa_dynamo.attention(q, k, v, mask=mask, kernel="cpu")
    ref = fa_dynamo.attention(q.double(), k.double(), v.double(), mask=mask, kernel="reference")
    (k_split, splits), = calls
    assert splits == 4 and k_split.shape[2] == 5000, "the 5000 filled slots, in chunks of >= 1024 keys"
    assert k_split.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert (out.double() - ref).abs().max() < 2e-6
