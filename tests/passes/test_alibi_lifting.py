"""ALiBi written in the graph reaches the op as slopes (``mask_lifting.Slope``, ``alibi_slopes``).

Each spelling is compiled and compared with eager on random inputs; where the bias is lifted the
compiled graph must hold no tensor of the scores' Sq×Sk shape other than none at all (the op
computes the bias per tile), and where it cannot be lifted exactly it stays a dense bias.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.conftest import ATTENTION_OP, Compiled, assert_same_as_eager
from tests.fuzz.harness import compare
from fa_dynamo.passes.matching import op_arguments

SQ = SK = 37
HEADS = 4


def _slopes(heads: int) -> torch.Tensor:
    return torch.exp2(-8.0 * torch.arange(1, heads + 1) / heads)


def _indices(s):
    sq, sk = s.shape[-2], s.shape[-1]
    return torch.arange(sq)[:, None], torch.arange(sk)[None, :]


def relative_causal(q, k, v):
    """The S×S spelling: ``slopes[h] · (j − i)`` with a causal mask."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    s = s + (_slopes(s.shape[1])[:, None, None] * (j - i)).to(s.dtype)
    return torch.softmax(s.masked_fill(j > i, float("-inf")), dim=-1) @ v


def negated_distance_causal(q, k, v):
    """``-slope · (i − j)`` (a negation and a scalar factor), bidirectional: exact, no mask needed."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    return torch.softmax(s + -(_slopes(s.shape[1]).view(1, -1, 1, 1) * (i - j)).to(s.dtype), dim=-1) @ v


def per_key_finfo(q, k, v):
    """MPT's spelling: a per-key ``slope · (j − (S − 1))`` from an arange built longer than needed
    and sliced, and a causal mask filled with finfo.min."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    length = 64
    alibi = torch.arange(1 - length, 1, dtype=torch.int32).view(1, 1, 1, length)
    alibi = (alibi * _slopes(s.shape[1]).view(1, -1, 1, 1)).squeeze(0)
    s = s + alibi[:, -s.shape[-2]:, -s.shape[-1]:].to(s.dtype)
    i, j = _indices(s)
    return torch.softmax(s.masked_fill(j > i, torch.finfo(s.dtype).min), dim=-1) @ v


def per_key_small_fill(q, k, v):
    """A per-key slope with a finite fill softmax can see (-5): the per-row constant the lifted
    form drops would change the hidden keys' weight, so the bias must stay dense."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    s = s + (_slopes(s.shape[1])[:, None, None] * j).to(s.dtype)
    return torch.softmax(s.masked_fill(j > i, -5.0), dim=-1) @ v


def scalar_slope_bmm(q, k, v):
    """One slope for all heads (a Python float), scores in the ``[B*H, S, S]`` bmm layout."""
    b, h, sq, d = q.shape
    s = torch.bmm(q.reshape(b * h, sq, d), k.reshape(b * h, -1, d).transpose(1, 2)) * d ** -0.5
    i, j = _indices(s)
    s = s + (0.25 * (j - i)).to(s.dtype)
    return torch.bmm(torch.softmax(s, -1), v.reshape(b * h, -1, v.shape[-1])).view(b, h, sq, -1)


def symmetric(q, k, v):
    """Encoder ALiBi ``-slope · |i − j|`` without a causal mask: not a linear slope, stays dense."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    return torch.softmax(s - (_slopes(s.shape[1])[:, None, None] * (i - j).abs()).to(s.dtype), dim=-1) @ v


def symmetric_causal(q, k, v):
    """The ALiBi paper's ``-slope · |i − j|`` under a causal mask: ``|j − i| = i − j`` on every
    visible key, so it is the slope form."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    s = s - (_slopes(s.shape[1])[:, None, None] * torch.abs(i - j)).to(s.dtype)
    return torch.softmax(s.masked_fill(j > i, float("-inf")), dim=-1) @ v


def _ops(compiled: Compiled) -> list:
    return [n for _, after in compiled.backend.graphs for n in after.graph.nodes if n.target is ATTENTION_OP]


def _square(compiled: Compiled, sq: int, sk: int) -> list:
    return [n.format_node() for _, after in compiled.backend.graphs for n in after.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2
            and tuple(n.meta["val"].shape[-2:]) == (sq, sk)]


@pytest.mark.parametrize("program, lifted", [
    (relative_causal, True), (negated_distance_causal, True), (per_key_finfo, True), (scalar_slope_bmm, True),
    (symmetric_causal, True), (per_key_small_fill, False), (symmetric, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alibi_spellings(program, lifted, dtype):
    q, k, v = (torch.randn(2, HEADS, SQ, 16, dtype=dtype) for _ in range(3))
    compiled = Compiled(program)
    # equal to eager, or (bfloat16: eager rounds the bias to 8 bits) no further from float64
    compare(compiled(q, k, v), program(q, k, v), [lambda: program(*(t.double() for t in (q, k, v)))], program.__name__,
            exact64="torch.finfo(" not in inspect.getsource(program))
    ops = _ops(compiled)
    assert len(ops) == 1
    slopes = op_arguments(ops[0])["alibi_slopes"]
    assert (slopes is not None) == lifted
    if lifted:
        assert op_arguments(ops[0])["bias"] is None, "no dense bias beside the slopes"
        assert not _square(compiled, SQ, SK), "an Sq×Sk tensor is left in the compiled graph"


def test_slopes_per_head_reach_the_op():
    """The op's slopes are the model's, laid out [1, H]."""
    q, k, v = (torch.randn(1, HEADS, SQ, 16) for _ in range(3))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("alibi_slopes"))
        return ATTENTION_OP(*args, **kwargs)

    compiled = Compiled(relative_causal)
    compiled(q, k, v)
    gm = compiled.backend.graphs[0][1]
    for node in gm.graph.nodes:
        if node.target is ATTENTION_OP:
            node.target = spy
    gm.recompile()
    gm(q, k, v)
    torch.testing.assert_close(seen[0], _slopes(HEADS)[None])


def test_dynamic_lengths_do_not_recompile():
    compiled = Compiled(relative_causal, dynamic=True)
    for length in (20, 33, 41):
        q, k, v = (torch.randn(1, HEADS, length, 16) for _ in range(3))
        assert_same_as_eager(compiled(q, k, v), relative_causal(q, k, v))
    assert len(compiled.backend.graphs) == 1
    assert _ops(compiled)[0].kwargs.get("alibi_slopes") is not None


def two_terms_one_kept(q, k, v):
    """A symmetric term that cannot be resolved (no band) beside a relative one: the first stays
    dense, the second becomes slopes."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = _indices(s)
    s = s - (0.5 * _slopes(s.shape[1])[:, None, None] * (i - j).abs()).to(s.dtype)
    s = s + (_slopes(s.shape[1])[:, None, None] * (j - i)).to(s.dtype)
    return torch.softmax(s, dim=-1) @ v


def test_terms_are_settled_one_by_one():
    q, k, v = (torch.randn(1, HEADS, SQ, 16) for _ in range(3))
    compiled = Compiled(two_terms_one_kept)
    assert_same_as_eager(compiled(q, k, v), two_terms_one_kept(q, k, v))
    op, = _ops(compiled)
    assert op_arguments(op)["alibi_slopes"] is not None and op_arguments(op)["bias"] is not None
