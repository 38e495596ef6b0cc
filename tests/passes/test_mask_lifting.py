"""Mask lifting on transformers' own mask code: packed sequences and chunked attention become a
band plus segment ids, and that description equals the mask the graph computes (random data).

The mask builders are traced with ``make_fx`` (pre-dispatch, fake tensors, as the backend traces);
the lifted description is then checked against the real mask on random inputs: the band from
``lift_hidden_set``, the ids from ``SegmentIds.emit`` run as part of the traced graph.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fa_dynamo.passes.matching import op_arguments
from fa_dynamo.kernels.mask import Band
from fa_dynamo.passes.attention.mask_lifting import lift_hidden_set
from fa_dynamo.passes.attention.mask_segments import lift_segments

mu = pytest.importorskip("transformers.masking_utils")

BATCH, SEQ, CHUNK = 2, 29, 6
SCORES = (BATCH, 4, SEQ, SEQ)


def packed_mask(position_ids):
    """transformers' causal mask for packed sequences (``create_causal_mask`` without a cache)."""
    ids = mu.find_packed_sequence_indices(position_ids)
    fn = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, position_ids)
    fn = mu.and_masks(fn, mu.packed_sequence_mask_function(ids))
    return mu.sdpa_mask(batch_size=BATCH, q_length=SEQ, kv_length=SEQ, mask_function=fn, allow_is_causal_skip=False)


def chunked_mask(left_padding):
    """Llama 4's chunked causal mask (``create_chunked_causal_mask``)."""
    fn = mu.chunked_causal_mask_function(CHUNK, left_padding)
    return mu.sdpa_mask(batch_size=BATCH, q_length=SEQ, kv_length=SEQ, mask_function=fn, allow_is_causal_skip=False)


def packed_positions(seed: int) -> torch.Tensor:
    """Position ids restarting at random points (several sequences per row), as a data loader packs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(BATCH):
        starts = (torch.rand(SEQ, generator=g) < 0.2).tolist()
        pos, p = [], 0
        for start in starts:
            p = 0 if start else p
            pos.append(p)
            p += 1
        rows.append(pos)
    return torch.tensor(rows)


def _describe(builder, example):
    """Trace ``builder``; return ``(graph module with the ids as extra outputs, band)``."""
    gm = make_fx(builder, pre_dispatch=True, tracing_mode="fake")(example)
    out = gm.graph.output_node()
    mask = out.args[0]
    lifted, why = lift_hidden_set(mask, SCORES)
    assert lifted is not None, why
    assert not lifted.where.complement and lifted.where.lo is None
    (factor,) = lifted.dense  # the band is lifted; one boolean term is left
    segments = lift_segments(factor, True, SCORES)
    assert segments is not None
    with gm.graph.inserting_before(out):
        q_ids, k_ids = segments.emit(gm.graph, BATCH, SEQ, SEQ)
    out.args = ((mask, q_ids, k_ids),)
    gm.recompile()
    return gm, Band(None, lifted.where.hi.const)


@pytest.mark.parametrize("builder, inputs", [
    (packed_mask, [packed_positions(s) for s in range(4)]),
    (chunked_mask, [torch.tensor([0, 3]), torch.tensor([5, 1]), torch.tensor([0, 0])]),
])
def test_lifted_description_equals_the_mask(builder, inputs):
    gm, band = _describe(builder, inputs[0])
    assert band == Band(None, 0)
    for x in inputs:
        mask, q_ids, k_ids = gm(x)
        assert torch.equal(mask, builder(x)), "the traced graph is the builder"
        assert q_ids.shape == (BATCH, SEQ) and k_ids.shape == (BATCH, SEQ) and not q_ids.dtype.is_floating_point
        hidden = band.hidden(torch.arange(SEQ), torch.arange(SEQ)) | (q_ids[:, :, None] != k_ids[:, None, :])
        assert torch.equal(~hidden[:, None], mask.expand(BATCH, 1, SEQ, SEQ))


def _lift(builder, *examples):
    gm = make_fx(builder, pre_dispatch=True, tracing_mode="fake")(*examples)
    return gm, lift_hidden_set(gm.graph.output_node().args[0], SCORES)[0]


def test_positions_compare_as_indices_only_within_their_own_sequences():
    """The same comparison ANDed with ids not derived from those positions stays dense."""

    def other_ids(position_ids, ids):
        fn = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, position_ids)
        fn = mu.and_masks(fn, mu.packed_sequence_mask_function(ids))
        return mu.sdpa_mask(batch_size=BATCH, q_length=SEQ, kv_length=SEQ, mask_function=fn,
                            allow_is_causal_skip=False)

    _, lifted = _lift(other_ids, packed_positions(0), torch.randint(0, 3, (BATCH, SEQ)))
    assert lifted.where.hi is None and len(lifted.dense) == 2


def _single_factor(fn, *examples):
    gm = make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*examples)
    return gm.graph.output_node().args[0]


def test_segment_equalities_and_near_misses():
    ids = torch.randint(0, 4, (BATCH, SEQ))
    same = _single_factor(lambda t: t[:, None, :, None] == t[:, None, None, :], ids)
    assert lift_segments(same, True, SCORES) is not None
    assert lift_segments(same, False, SCORES) is None, "True-hidden equality is not a segment mask"
    differ = _single_factor(lambda t: t[:, None, :, None] != t[:, None, None, :], ids)
    assert lift_segments(differ, False, SCORES) is not None
    per_head = _single_factor(lambda t: t[:, :, :, None] == t[:, :, None, :], torch.randint(0, 4, (BATCH, 4, SEQ)))
    assert lift_segments(per_head, True, SCORES) is None, "ids that vary by head are not per-row ids"
    both = _single_factor(lambda t: t == t.transpose(-1, -2), torch.randint(0, 4, (BATCH, 1, SEQ, SEQ)))
    assert lift_segments(both, True, SCORES) is None, "a side that depends on both indices"
    floats = _single_factor(lambda t: t[:, None, :, None] == t[:, None, None, :], torch.rand(BATCH, SEQ))
    assert lift_segments(floats, True, SCORES) is None, "float ids are not integer segment ids"
    ordered = _single_factor(lambda t: t[:, None, :, None] <= t[:, None, None, :], ids)
    assert lift_segments(ordered, True, SCORES) is None


def test_two_segment_equalities_become_one():
    """Documents packed into a row and chunks within them (``doc[i] == doc[j] & chunk[i] ==
    chunk[j]``): one pair of id vectors reaches the op, no Sq×Sk mask; outputs equal eager."""
    from tests.conftest import ATTENTION_OP, Compiled, assert_same_as_eager

    def program(q, k, v, doc):
        s = q @ k.mT * q.shape[-1] ** -0.5
        i, j = torch.arange(s.shape[-2]), torch.arange(s.shape[-1])
        chunk = i // 5
        same = (doc[:, None, :, None] == doc[:, None, None, :]) & (chunk[:, None] == chunk[None, :])
        same = same & (j[None, :] <= i[:, None])
        return torch.softmax(s.masked_fill(~same, float("-inf")), -1) @ v

    q, k, v = (torch.randn(2, 4, SEQ, 16) for _ in range(3))
    doc = torch.tensor([[0] * 10 + [1] * 19, [0] * 3 + [1] * 20 + [2] * 6])
    compiled = Compiled(program)
    assert_same_as_eager(compiled(q, k, v, doc), program(q, k, v, doc))
    ops = [n for _, gm in compiled.backend.graphs for n in gm.graph.nodes if n.target is ATTENTION_OP]
    assert len(ops) == 1 and op_arguments(ops[0])["q_segments"] is not None and op_arguments(ops[0])["mask"] is None
