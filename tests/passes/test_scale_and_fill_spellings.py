"""Scale and fill spellings found by a held-out fuzzer (2026-11-25): a one-element tensor scale
(``torch.sqrt(torch.tensor(d))``), a scale applied after the mask or bias, and a fill written as
``torch.full_like(s, v)``. Each must fuse, keep a lifted mask lifted, and equal eager; the
near-misses beside them must stay unfused."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import ATTENTION_OP, Compiled, assert_same_as_eager
from fa_dynamo.passes.matching import op_arguments

S = 29


def _causal(s):
    return torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()


def tensor_sqrt_scale(q, k, v):
    s = q @ k.transpose(-1, -2)
    s = s / torch.sqrt(torch.tensor(q.shape[-1], dtype=s.dtype))
    return torch.softmax(s.masked_fill(~_causal(s), float("-inf")), -1) @ v


def tensor_scale_multiplied(q, k, v):
    s = torch.tensor(q.shape[-1] ** -0.5, dtype=q.dtype).reshape(1, 1, 1, 1) * (q @ k.transpose(-1, -2))
    return torch.softmax(s, -1) @ v


def mask_then_scale(q, k, v):
    s = (q @ k.transpose(-1, -2)).masked_fill(~_causal(q @ k.transpose(-1, -2)), -1e4)
    return torch.softmax(s / math.sqrt(q.shape[-1]), -1) @ v


def additive_mask_then_scale(q, k, v):
    s = q @ k.transpose(-1, -2)
    s = s + torch.full((s.shape[-2], s.shape[-1]), float("-inf"), dtype=s.dtype).triu(1)
    return torch.softmax(s * q.shape[-1] ** -0.5, -1) @ v


def bias_then_scale(q, k, v, bias):
    return torch.softmax((q @ k.transpose(-1, -2) + bias) / 4.0, -1) @ v


def full_like_fill(q, k, v):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(s.where(_causal(s), torch.full_like(s, float("-inf"))), -1) @ v


def negative_scale_after_mask(q, k, v):  # -inf · (-1) = +inf: not the same as scaling first
    s = (q @ k.transpose(-1, -2)).masked_fill(~_causal(q @ k.transpose(-1, -2)), float("-inf"))
    return torch.softmax(s * -0.25, -1) @ v


def per_element_tensor_scale(q, k, v, bias):  # an [S, S] tensor is not a scale
    return torch.softmax((q @ k.transpose(-1, -2)) * bias[0, 0].sigmoid(), -1) @ v


def _inputs(dtype, with_bias):
    q, k, v = (torch.randn(2, 4, S, 16, dtype=dtype) for _ in range(3))
    return (q, k, v, torch.randn(1, 4, S, S, dtype=dtype)) if with_bias else (q, k, v)


def _ops(compiled):
    return [n for _, gm in compiled.backend.graphs for n in gm.graph.nodes if n.target is ATTENTION_OP]


@pytest.mark.parametrize("program, with_bias, band", [
    (tensor_sqrt_scale, False, True), (tensor_scale_multiplied, False, False), (mask_then_scale, False, True),
    (additive_mask_then_scale, False, True), (bias_then_scale, True, False), (full_like_fill, False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused(program, with_bias, band, dtype):
    args = _inputs(dtype, with_bias)
    compiled = Compiled(program)
    assert_same_as_eager(compiled(*args), program(*args))
    op, = _ops(compiled)
    assert (op_arguments(op)["max_offset"] is not None) == band, "the causal mask is lifted to a band (no S×S tensor)"
    assert op_arguments(op)["mask"] is None


@pytest.mark.parametrize("program, with_bias", [(negative_scale_after_mask, False), (per_element_tensor_scale, True)])
def test_near_misses_stay_unfused(program, with_bias):
    args = _inputs(torch.float32, with_bias)
    compiled = Compiled(program, options={"strict": False})
    assert_same_as_eager(compiled(*args), program(*args))
    assert compiled.fused == 0 and compiled.refused


def zeroed_baddbmm_then_tensor_scale(q, k, v, bias):
    """``baddbmm`` onto ``empty().zero_()``, then a bias, then a one-element tensor scale: the
    scale moves ahead of the bias (``(s + b) / t = s / t + b / t`` for any t)."""
    b, h, sq, d = q.shape
    s = torch.baddbmm(torch.empty(b * h, sq, k.shape[2], dtype=q.dtype).zero_(), q.reshape(b * h, sq, d),
                      k.reshape(b * h, -1, d).transpose(1, 2), beta=1.0, alpha=1.0)
    s = (s.view(b, h, sq, -1) + bias) / torch.sqrt(torch.tensor(d, dtype=q.dtype))
    return torch.softmax(s, -1) @ v


def test_zeroed_baddbmm_and_tensor_scale_after_a_bias():
    args = _inputs(torch.float32, True)
    compiled = Compiled(zeroed_baddbmm_then_tensor_scale)
    assert_same_as_eager(compiled(*args), zeroed_baddbmm_then_tensor_scale(*args))
    op, = _ops(compiled)
    assert op_arguments(op)["bias"] is not None  # the bias, divided by t
