"""Segment masks (``q_segments`` / ``k_segments``) against float64 eager attention with the
equivalent dense mask: every kernel, random layouts, bands, GQA, Sq != Sk, gradients, opcheck,
tile classification and the absence of Sq×Sk intermediates."""

from __future__ import annotations

import pytest
import torch

import fa_dynamo
from fa_dynamo.kernels import cpu
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.mask import Band, TileKind
from fa_dynamo.kernels.segments import Segments, SegmentTiles, segments_as_mask
from tests.kernels.test_ops import _LargestTensor, _case, _check_accuracy, eager_attention

LAYOUTS = ("packed", "unsorted", "single", "singletons")


def segment_ids(layout: str, batch: int, num_q: int, num_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_ids [B, Sq], k_ids [B, Sk])``. Sorted layouts put the queries on the last ``Sq`` keys
    (a prefill continuing a cache); ``unsorted`` draws both sides independently."""
    g = torch.Generator().manual_seed(seed)
    length = max(num_q, num_k)
    if layout == "unsorted":
        return torch.randint(0, 4, (batch, num_q), generator=g), torch.randint(0, 4, (batch, num_k), generator=g)
    if layout == "packed":
        ids = torch.stack([(torch.rand(length, generator=g) < 0.12).cumsum(0) for _ in range(batch)])
    elif layout == "single":
        ids = torch.randint(0, 100, (batch, 1), generator=g).expand(batch, length)
    else:  # every token its own sequence
        ids = torch.arange(length).expand(batch, length) + torch.randint(0, 100, (batch, 1), generator=g)
    ids = ids + 3 * torch.arange(batch)[:, None]  # rows of the batch differ
    return ids[:, length - num_q:].contiguous(), ids[:, length - num_k:].contiguous()


def hidden_of(q_ids: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor:
    """The dense mask the ids stand for, written independently of the kernels: ``[B, 1, Sq, Sk]``."""
    return q_ids[:, None, :, None] != k_ids[:, None, None, :]


def _call(q, k, v, kernel, kw, ids, scale, **extra):
    return fa_dynamo.attention(
        q, k, v, bias=kw.get("bias"), mask=kw.get("mask"), scale=scale, min_offset=kw.get("lo"),
        max_offset=kw.get("hi"), kernel=kernel, q_segments=ids[0], k_segments=ids[1], **extra,
    )


@pytest.mark.parametrize("kernel", ["cpu", "sdpa", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape, masks, dtype",
    [
        ((2, 4, 2, 61, 61, 16, 16), "causal", torch.float32),
        ((1, 6, 2, 23, 70, 24, 24), "causal", torch.bfloat16),
        ((2, 4, 1, 45, 45, 16, 16), "window", torch.float32),
        ((1, 2, 2, 40, 33, 8, 8), "none", torch.float64),
        ((2, 4, 4, 50, 50, 16, 16), "causal+mask", torch.float32),
        ((1, 2, 1, 37, 37, 16, 16), "bias", torch.float32),
    ],
)
def test_matches_float64(kernel, layout, shape, masks, dtype):
    q, k, v, kw = _case(shape, dtype, masks, seed=11)
    ids = segment_ids(layout, shape[0], shape[3], shape[4], seed=5)
    out = _call(q, k, v, kernel, kw, ids, 0.3, block_q=16, block_k=8)
    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.dtype == dtype
    hidden = hidden_of(*ids)
    dense = {**kw, "mask": hidden if "mask" not in kw else kw["mask"] | hidden}
    _check_accuracy(out, q, k, v, dense, 0.3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fill", [float("-inf"), -10.0])
def test_gradients_match_float64(layout, fill):
    shape = (2, 4, 2, 29, 41, 16, 16)
    q, k, v, kw = _case(shape, torch.float32, "causal", seed=2)
    ids = segment_ids(layout, shape[0], shape[3], shape[4], seed=9)
    dense = {**kw, "mask": hidden_of(*ids)}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _call(*leaves, "cpu", kw, ids, 0.3, fill=fill, block_q=8)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    eager_attention(*ref, scale=0.3, fill=fill, **dense).backward(grad.double())
    same = [t.clone().requires_grad_() for t in (q, k, v)]
    eager_attention(*same, scale=0.3, fill=fill, **dense).backward(grad)
    for ours, r, e in zip(leaves, ref, same):
        assert torch.equal(ours.grad.isnan(), r.grad.isnan())
        err = (ours.grad.double() - r.grad).nan_to_num().abs().max().item()
        eager_err = (e.grad.double() - r.grad).nan_to_num().abs().max().item()
        assert err <= 3 * eager_err + 1e-5, (err, eager_err)


def test_opcheck():
    q, k, v, kw = _case((2, 4, 2, 19, 23, 8, 8), masks="causal+mask")
    q_ids, k_ids = segment_ids("packed", 2, 19, 23, seed=1)
    for args in [
        (q, k, v, None, None, 0.3, 0.0, float("-inf"), None, None, "cpu", 8, 8),
        (q, k, v, None, kw["mask"], 0.3, 0.0, -1e9, None, 4, "cpu", 8, 8),
        (q.requires_grad_(), k.requires_grad_(), v, None, None, 0.3, 0.0, float("-inf"), None, 4, "reference", 8, 8),
    ]:
        torch.library.opcheck(torch.ops.fa_dynamo.attention.default, args, {"q_segments": q_ids, "k_segments": k_ids})


@pytest.mark.parametrize(
    "q_ids, k_ids, message",
    [
        (torch.zeros(2, 5, dtype=torch.long), None, "go together"),
        (torch.arange(10).view(2, 5), torch.arange(12).view(2, 6), r"k_segments must have shape \[B, Sk\]"),
        (torch.arange(5)[None], torch.arange(7)[None], r"q_segments must have shape \[B, Sq\]"),
        (torch.rand(2, 5), torch.rand(2, 7), "integer sequence ids"),
        (torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool), "integer sequence ids"),
    ],
)
def test_bad_segments_raise_clear_errors(q_ids, k_ids, message):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    with pytest.raises(ValueError, match=message):
        fa_dynamo.attention(q, k, v, q_segments=q_ids, k_segments=k_ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tile_classification_is_exact_where_it_claims(layout):
    """EMPTY tiles hide every key and FULL tiles none; unsorted ids classify nothing."""
    q_ids, k_ids = segment_ids(layout, 2, 90, 120, seed=4)
    tiles = SegmentTiles(Segments(q_ids, k_ids))
    assert tiles.sorted == (layout != "unsorted")
    hidden = hidden_of(q_ids, k_ids)[:, 0]
    g = torch.Generator().manual_seed(0)
    kinds = []
    for _ in range(300):
        q0, k0 = int(torch.randint(0, 89, (1,), generator=g)), int(torch.randint(0, 119, (1,), generator=g))
        q1 = q0 + int(torch.randint(1, 91 - q0, (1,), generator=g))
        k1 = k0 + int(torch.randint(1, 121 - k0, (1,), generator=g))
        kind = tiles.classify(q0, q1, k0, k1)
        tile = hidden[:, q0:q1, k0:k1]
        assert kind is not TileKind.EMPTY or tile.all()
        assert kind is not TileKind.FULL or not tile.any()
        kinds.append(kind)
    if layout == "unsorted":
        assert set(kinds) == {TileKind.PARTIAL}
    if layout == "singletons":
        assert TileKind.EMPTY in kinds
    if layout == "single":
        assert set(kinds) == {TileKind.FULL}


def test_packed_tiles_are_skipped_and_no_score_matrix_is_allocated(monkeypatch):
    """Sorted packed ids: the CPU kernel visits only the diagonal blocks, and its scratch stays
    O(block_q × block_k)."""
    q, k, v = (torch.randn(1, 2, 2048, 32) for _ in range(3))
    ids = (torch.arange(2048) // 256)[None]  # 8 sequences of 256 tokens
    visited = []
    segment = cpu.Problem.segment

    def record(self, q0, q1, k0, k1, *flags):
        visited.append((k1 - k0) * (q1 - q0))
        return segment(self, q0, q1, k0, k1, *flags)

    monkeypatch.setattr(cpu.Problem, "segment", record)
    with _LargestTensor() as mode:
        out, _ = cpu.attention_cpu(q, k, v, None, None, AttentionParams(
            scale=0.2, band=Band(None, 0), block_q=128, block_k=128, segments=Segments(ids, ids)))
    assert mode.largest <= q.numel(), f"largest intermediate has {mode.largest} elements"
    assert sum(visited) == 8 * 3 * 128 * 128  # the causal 2×2-tile triangle of each 256-token block
    ref = eager_attention(q.double(), k.double(), v.double(), scale=0.2, hi=0, mask=hidden_of(ids, ids)[0, 0])
    assert (out.double() - ref).abs().max() < 1e-5


def test_dense_fallback_is_the_segment_mask():
    q_ids, k_ids = segment_ids("unsorted", 2, 9, 13, seed=3)
    mask = torch.rand(2, 3, 9, 13) > 0.7
    segments = Segments(q_ids, k_ids)
    assert torch.equal(segments_as_mask(None, segments, "test"), hidden_of(q_ids, k_ids))
    assert torch.equal(segments_as_mask(mask, segments, "test"), mask | hidden_of(q_ids, k_ids))
    assert segments_as_mask(mask, None, "test") is mask
