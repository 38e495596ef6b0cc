"""Structural ALiBi (kernels/alibi.py): the op's ``alibi_slopes`` against the same bias written out.

Every kernel must give what eager gives with the dense bias ``slopes[b, h] · (j − i)`` added to
the scores (judged against float64 as in test_ops.py), gradients included (the slopes' too), and
the Triton kernels the same under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fa_dynamo
from fa_dynamo.kernels.alibi import Alibi, alibi_as_bias
from tests.kernels.test_ops import TESTED_KERNELS, _case, _check_accuracy


def dense_alibi(slopes: torch.Tensor, num_q: int, num_k: int) -> torch.Tensor:
    """The bias written out independently of kernels/alibi.py: ``[B or 1, H, Sq, Sk]``."""
    if slopes.dim() == 1:
        slopes = slopes[None]
    distance = torch.arange(num_k)[None, :] - torch.arange(num_q)[:, None]
    return slopes[:, :, None, None] * distance.to(slopes.dtype)


def _slopes(batch: int, heads: int, form: str, seed: int = 0) -> torch.Tensor:
    """ALiBi's geometric slopes, perturbed so no two heads share one; ``form`` picks the shape."""
    g = torch.Generator().manual_seed(seed)
    base = torch.exp2(-8.0 * torch.arange(1, heads + 1) / heads) * (1 + 0.1 * torch.rand(heads, generator=g))
    return {"h": base, "1h": base[None], "bh": base[None] * (1 + torch.rand(batch, 1, generator=g)),
            "11": base[:1][None]}[form]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (4, 2), (3, 1)]), st.integers(1, 90),
                    st.integers(1, 90), st.sampled_from([8, 24])).map(
        lambda t: (t[0], t[1][0], t[1][1], t[2], t[3], t[4], t[4])),
    masks=st.sampled_from(["none", "causal", "window", "bias+causal", "mask"]),
    form=st.sampled_from(["h", "1h", "bh", "11"]),
    kernel=st.sampled_from(TESTED_KERNELS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    blocks=st.sampled_from([(16, 16), (64, 32)]),
    softcap=st.sampled_from([0.0, 20.0]),
)
def test_slopes_match_the_dense_bias(shape, masks, form, kernel, dtype, blocks, softcap):
    q, k, v, kw = _case(shape, dtype, masks)
    slopes = _slopes(shape[0], shape[1], form)
    out = fa_dynamo.attention(
        q, k, v, bias=kw.get("bias"), mask=kw.get("mask"), scale=shape[5] ** -0.5, softcap=softcap,
        min_offset=kw.get("lo"), max_offset=kw.get("hi"), kernel=kernel, block_q=blocks[0], block_k=blocks[1],
        alibi_slopes=slopes,
    )
    alibi = dense_alibi(slopes.double(), shape[3], shape[4])
    bias = alibi if "bias" not in kw else kw["bias"].double() + alibi
    _check_accuracy(out, q, k, v, {**kw, "bias": bias.to(dtype) if dtype != torch.float64 else bias},
                    shape[5] ** -0.5, softcap=softcap)


def test_row_constant_does_not_change_attention():
    """Why the pass may hand the op ``slope · (j − i)`` for a model's ``slope · j``."""
    q, k, v, kw = _case((1, 4, 4, 40, 40, 16, 16), masks="causal")
    slopes = _slopes(1, 4, "h")
    per_key = slopes[None, :, None, None] * torch.arange(40.0)
    eager = fa_dynamo.attention(q, k, v, bias=per_key, max_offset=0, kernel="reference")
    lifted = fa_dynamo.attention(q, k, v, alibi_slopes=slopes, max_offset=0)
    torch.testing.assert_close(lifted, eager, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_gradients_match_float64_including_the_slopes(kernel):
    q, k, v, kw = _case((2, 4, 2, 37, 45, 16, 16), torch.float32, "causal", seed=3)
    slopes = _slopes(2, 4, "bh")
    go = torch.randn(2, 4, 37, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes)]
    out = fa_dynamo.attention(*leaves[:3], max_offset=kw["hi"], alibi_slopes=leaves[3], kernel=kernel, block_q=16)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, slopes)]
    s = ref_leaves[0] @ ref_leaves[1].repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    s = s + dense_alibi(ref_leaves[3], 37, 45)
    s = s.masked_fill((torch.arange(45)[None] - torch.arange(37)[:, None]) > kw["hi"], float("-inf"))
    ref_out = torch.softmax(s, -1) @ ref_leaves[2].repeat_interleave(2, 1)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, go.double())
    for name, got, want in zip("q k v slopes".split(), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)


def test_opcheck():
    q, k, v, _ = _case((1, 4, 2, 20, 28, 16, 16), masks="none")
    slopes = _slopes(1, 4, "1h").requires_grad_()
    q.requires_grad_()
    torch.library.opcheck(
        torch.ops.fa_dynamo.attention.default,
        (q, k, v, None, None, 0.25, 0.0, float("-inf"), None, 0, "cpu", 16, 16),
        {"alibi_slopes": slopes},
    )


@pytest.mark.parametrize("slopes, message", [
    (torch.ones(3), r"alibi_slopes must be \[Hq\] or \[B, Hq\]"),
    (torch.ones(2, 4, 1), r"alibi_slopes must be \[Hq\] or \[B, Hq\]"),
    (torch.ones(4, dtype=torch.int64), "alibi_slopes must be floating point"),
])
def test_bad_slopes_raise_clear_errors(slopes, message):
    q, k, v, _ = _case((1, 4, 2, 8, 8, 16, 16))
    with pytest.raises(ValueError, match=message):
        fa_dynamo.attention(q, k, v, alibi_slopes=slopes)


def test_dense_fallback_is_the_same_bias():
    slopes = _slopes(2, 3, "bh")
    bias = torch.randn(1, 3, 5, 7)
    got = alibi_as_bias(bias, Alibi(slopes), 5, 7, "test")
    torch.testing.assert_close(got, bias + dense_alibi(slopes, 5, 7))
    assert alibi_as_bias(bias, None, 5, 7, "test") is bias


def test_tiled_kernel_never_builds_the_whole_bias():
    """The CPU kernel's largest ALiBi tensor covers one block of query rows (a run of full key
    tiles goes to ATen as one call), never [B, H, Sq, Sk]."""
    q, k, v, _ = _case((1, 2, 2, 300, 300, 16, 16))
    seen = []
    original = Alibi.scores

    def recording(self, q_idx, k_idx, dtype):
        seen.append((len(q_idx), len(k_idx)))
        return original(self, q_idx, k_idx, dtype)

    Alibi.scores = recording
    try:
        fa_dynamo.attention(q, k, v, alibi_slopes=_slopes(1, 2, "h"), max_offset=0, kernel="cpu",
                            block_q=64, block_k=128)
    finally:
        Alibi.scores = original
    assert seen and max(rows for rows, _ in seen) <= 64 and sum(r * c for r, c in seen) < 300 * 300
