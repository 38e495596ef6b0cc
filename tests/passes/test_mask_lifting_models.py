"""Segment masks on real models: packed-sequence Llama and Llama 4's chunked attention compile to
``fa_dynamo::attention`` with ``q_segments``/``k_segments`` and a causal band, and no Sq×Sk
tensor is left in the compiled graph; outputs equal eager."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.models.corpus import SEQ, WINDOW, build_case  # noqa: E402
from tests.models.measure import ATTENTION_OP, measure_fastattention  # noqa: E402
from fa_dynamo.passes.matching import op_arguments


def _square(node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[-2:]) == (SEQ, SEQ)


@pytest.mark.parametrize("family, case, with_segments", [
    ("llama", "packed", 2),  # both layers: several sequences per row
    ("llama4", "nopad", 1),  # the chunked layer (the other one is full attention)
    ("llama4", "pad_left", 1),  # chunks counted from each row's first token
    ("llama4", "packed", 2),  # packed and chunked at once: the two id equalities become one
])
def test_segments_replace_the_square_mask(family, case, with_segments):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = measure_fastattention(build_case(family, case))
    torch.testing.assert_close(m.actual[m.valid], m.expected[m.valid], atol=1e-4, rtol=1e-4)
    assert m.fused == m.sites == 2
    ops = [n for gm in m.afters for n in gm.graph.nodes if n.target is ATTENTION_OP]
    assert sum(op_arguments(n)["q_segments"] is not None for n in ops) == with_segments
    assert all(op_arguments(n)["max_offset"] == 0 for n in ops), "the causal band is lifted"
    squares = [n.format_node() for gm in m.afters for n in gm.graph.nodes if _square(n)]
    assert not squares, f"Sq×Sk tensors left in the compiled graph: {squares}"


@pytest.mark.parametrize("case", ["nopad", "pad_left", "decode"])
def test_mpt_alibi_reaches_the_op_as_slopes(case):
    """MPT builds ALiBi as ``arange(1 - L, 1) * slopes`` over ``max_seq_len`` and slices it: the op
    gets per-head slopes and no bias tensor; outputs equal eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = measure_fastattention(build_case("mpt", case))
    torch.testing.assert_close(m.actual[m.valid], m.expected[m.valid], atol=1e-4, rtol=1e-4)
    assert m.fused == m.sites == 2
    ops = [n for gm in m.afters for n in gm.graph.nodes if n.target is ATTENTION_OP]
    assert all(op_arguments(n)["alibi_slopes"] is not None and op_arguments(n)["bias"] is None for n in ops)


@pytest.mark.parametrize("case", ["nopad", "pad_left", "decode_pad_left"])
def test_sdpa_sliding_window_is_a_band(case):
    """Mistral as shipped (SDPA): transformers compares positions, ``pos[kv] > pos[q] - window``,
    beside the sequence-id equality it derives from them; inside one sequence that is
    ``kv > q - window``, a band: the op gets ``-(window - 1) <= j - i <= 0`` and no Sq×Sk mask."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = measure_fastattention(build_case("mistral", case, attn="sdpa"))
    torch.testing.assert_close(m.actual[m.valid], m.expected[m.valid], atol=1e-4, rtol=1e-4)
    ops = [n for gm in m.afters for n in gm.graph.nodes if n.target is ATTENTION_OP]
    assert m.fused == m.sites == len(ops) == 2
    # decode: the sliding-window cache holds the last WINDOW keys, all visible to the new token
    lo = 0 if case.startswith("decode") else -(WINDOW - 1)
    assert all(op_arguments(n)["min_offset"] == lo for n in ops), [(op_arguments(n)["min_offset"], op_arguments(n)["max_offset"]) for n in ops]
    squares = [n.format_node() for gm in m.afters for n in gm.graph.nodes if _square(n)]
    assert not squares, f"Sq×Sk tensors left in the compiled graph: {squares}"
