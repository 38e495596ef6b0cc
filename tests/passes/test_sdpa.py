"""SDPA calls as attention sites (``fa_dynamo/passes/attention/sdpa.py``): every form SDPA is called in,
against eager SDPA, with the graph checked (one op, no SDPA left, masks lifted) and near-misses
left as SDPA calls with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import ATTENTION_OP, Compiled, assert_same_as_eager
from fa_dynamo.passes.matching import op_arguments

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
B, H, S, D = 2, 4, 37, 16


def _qkv(*shape_, dtype=torch.float32, heads_kv=H, dv=D, sk=S):
    b, h, s, d = shape_ or (B, H, S, D)
    return (torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, heads_kv, sk, d, dtype=dtype),
            torch.randn(b, heads_kv, sk, dv, dtype=dtype))


def _ops(compiled: Compiled, target=ATTENTION_OP) -> list[torch.fx.Node]:
    return [n for _, after in compiled.backend.graphs for n in after.graph.nodes if n.target is target]


def _random_mask(sq=S, sk=S, batch=B, empty_row=3) -> torch.Tensor:
    mask = torch.rand(batch, 1, sq, sk) > 0.4  # True = attend, as SDPA reads it
    mask[0, 0, empty_row] = False  # a row with no visible key: SDPA gives 0 there
    return mask


def _fused_once(fn, *args, options=None, dynamic=None):
    c = Compiled(fn, options=options, dynamic=dynamic)
    out = c(*args)
    assert c.fused == 1 and not c.refused, c.refused
    assert not _ops(c, SDPA), "the SDPA call is still in the graph"
    return c, out


CASES = {
    "no mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "scale": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3),
    "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "causal, fewer queries": lambda q, k, v: F.scaled_dot_product_attention(q[:, :, :5], k, v, is_causal=True),
    "causal, fewer keys": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], is_causal=True),
    "value head dim": lambda q, k, v: F.scaled_dot_product_attention(q, k, torch.cat([v, v[..., :5]], -1)),
    "3-D": lambda q, k, v: F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True),
    "one kv head broadcast": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1]),
    "enable_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
    "enable_gqa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=True,
                                                                         enable_gqa=True),
    "flash cpu op": lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0],
}


@pytest.mark.parametrize("name", CASES)
def test_sdpa_forms_match_eager(name):
    fn, (q, k, v) = CASES[name], _qkv()
    _, out = _fused_once(fn, q, k, v)
    assert_same_as_eager(out, fn(q, k, v))


def test_is_causal_becomes_a_band_not_a_mask():
    q, k, v = _qkv()
    c, _ = _fused_once(CASES["causal, fewer queries"], q, k, v)
    (op,) = _ops(c)
    assert op_arguments(op)["bias"] is None and op_arguments(op)["mask"] is None, "a causal mask tensor reached the op"
    assert (op_arguments(op)["min_offset"], op_arguments(op)["max_offset"]) == (None, 0), "top-left causal is the band j - i <= 0"


@pytest.mark.parametrize("kind", ["bool", "float", "bool + is_causal"])
def test_masks_with_rows_that_see_no_key_give_zero_as_sdpa_does(kind):
    q, k, v = _qkv()
    mask = _random_mask()
    if kind == "float":
        mask = torch.randn(B, H, S, S).masked_fill(~mask, float("-inf"))
    causal = kind.endswith("is_causal")
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)  # noqa: E731
    _, out = _fused_once(fn, q, k, v, mask)
    expected = fn(q, k, v, mask)
    assert (expected[0, :, 3] == 0).all() and not expected.isnan().any()
    assert_same_as_eager(out, expected)


@pytest.mark.parametrize("kernel", ["cpu", "reference", "sdpa", "triton"])
def test_gradients_match_eager_sdpa_with_empty_rows(kernel):
    """No NaN and no gradient through a row that sees no key, in every kernel's backward."""
    q, k, v = _qkv(dtype=torch.float64)
    mask = _random_mask()
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]  # float64 eager SDPA
    grad = torch.randn(B, H, S, D)
    c, out = _fused_once(fn, *leaves, mask, options={"kernel": kernel})
    out.backward(grad)
    fn(*reference, mask).backward(grad.double())
    for got, want in zip(leaves, reference):
        assert not got.grad.isnan().any()
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)
    assert (leaves[0].grad[0, :, 3] == 0).all()


def test_dropout_in_sdpa_is_refused_and_the_call_kept():
    q, k, v = _qkv()
    c = Compiled(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    out = c(q, k, v)
    assert c.fused == 0 and out.shape == (B, H, S, D)
    ((_, why),) = c.refused
    assert "dropout in training mode (p=0.5)" in why
    assert len(_ops(c, SDPA)) == 1, "the refused site's SDPA call must be restored"


def test_five_dim_operands_stay_sdpa_with_a_reason():
    q, k, v = (t.reshape(2, 2, 2, S, D) for t in _qkv())
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    c = Compiled(fn)
    assert_same_as_eager(c(q, k, v), fn(q, k, v))
    assert c.fused == 0 and "more than two batch dims" in c.refused[0][1]
    assert len(_ops(c, SDPA)) == 1


def test_lse_read_from_the_cpu_flash_op_is_refused():
    q, k, v = _qkv()
    c = Compiled(lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[1])
    c(q, k, v)
    assert c.fused == 0 and "log-sum-exp" in c.refused[0][1]


@pytest.mark.parametrize("mask,error", [
    (torch.ones(1, 1, S, S, dtype=torch.int32), "attn_mask dtype"),
    (torch.zeros(1, 1, S, S, dtype=torch.float64), "attn_mask dtype"),
    (torch.ones(1, 3, S, S, dtype=torch.bool), "must match the size|broadcast"),
])
def test_misuse_raises_what_eager_sdpa_raises(mask, error):
    """SDPA's own checks reject these while Dynamo traces the call (the pass never sees them)."""
    q, k, v = _qkv()
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    with pytest.raises(RuntimeError, match=error):
        fn(q, k, v, mask)
    with pytest.raises(RuntimeError, match=error):
        Compiled(fn)(q, k, v, mask)


def test_dynamic_lengths_one_compile():
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)  # noqa: E731
    c = Compiled(fn, dynamic=True)
    for s in (37, 64, 9):
        q, k, v = _qkv(B, H, s, D, sk=s)
        mask = torch.rand(B, 1, 1, s) > 0.2  # key padding
        assert_same_as_eager(c(q, k, v, mask), fn(q, k, v, mask))
    assert len(c.backend.graphs) == 1 and c.fused == 1


def test_bfloat16_and_autocast():
    q, k, v = _qkv()
    mask = _random_mask()
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    args = [t.bfloat16() for t in (q, k, v)]
    _, out = _fused_once(fn, *args, mask)
    assert out.dtype == torch.bfloat16
    assert_same_as_eager(out, fn(*args, mask))

    def under_autocast(q, k, v, m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    _, out = _fused_once(under_autocast, q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert_same_as_eager(out, under_autocast(q, k, v, mask))


def test_repeat_kv_before_sdpa_is_undone():
    def repeat_kv(x, n):  # transformers' copy, as its SDPA path runs it when a mask is given
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    q, k, v = _qkv(heads_kv=2)
    mask = _random_mask()
    for spell in (lambda x: repeat_kv(x, 2), lambda x: x.repeat_interleave(2, dim=1)):
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, spell(k), spell(v), attn_mask=m)  # noqa: E731
        c, out = _fused_once(fn, q, k, v, mask)
        assert_same_as_eager(out, fn(q, k, v, mask))
        (op,) = _ops(c)
        assert op.args[1].meta["val"].shape[1] == 2, "K reached the op repeated"


# --- SDPA code from outside transformers -----------------------------------------------------


class GptFastAttention(nn.Module):
    """gpt-fast's attention: a static KV cache written in place, GQA by ``repeat_interleave`` of
    the whole cache, and the mask indexed from a causal buffer by the input positions (data: it
    stays a dense operand, and the CPU kernel skips the cache tiles it hides)."""

    def __init__(self, heads=4, kv_heads=2, head_dim=16, max_seq=96):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        dim = heads * head_dim
        self.wq, self.wkv, self.wo = nn.Linear(dim, dim), nn.Linear(dim, 2 * kv_heads * head_dim), nn.Linear(dim, dim)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_seq, head_dim))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_seq, head_dim))
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)))

    def forward(self, x, input_pos):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, s, 2 * self.kv_heads, self.head_dim).transpose(1, 2).split(self.kv_heads, 1)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        k = self.k_cache.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = self.v_cache.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal_mask[None, None, input_pos])
        return self.wo(y.transpose(1, 2).contiguous().view(b, s, -1))


def test_gpt_fast_static_cache_prefill_and_decode():
    model = GptFastAttention().eval()
    eager = copy.deepcopy(model)
    c = Compiled(model)
    steps = [(torch.randn(1, 11, 64), torch.arange(11))] + [(torch.randn(1, 1, 64), torch.tensor([t])) for t in (11, 12, 13)]
    with torch.no_grad():
        for x, pos in steps:
            assert_same_as_eager(c(x, pos), eager(x, pos))
    ops = _ops(c)
    assert c.fused == len(ops) >= 2 and not c.refused
    assert all(op.args[1].meta["val"].shape[1] == 2 for op in ops), "the repeated cache reached the op"


def test_nanogpt_causal_self_attention():
    class CausalSelfAttention(nn.Module):  # nanoGPT's, flash path
        def __init__(self, n_embd=64, n_head=4):
            super().__init__()
            self.c_attn, self.c_proj, self.n_head = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd), n_head
            self.dropout = 0.1

        def forward(self, x):
            b, t, c = x.size()
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    model = CausalSelfAttention().eval()
    x = torch.randn(2, 29, 64)
    c, out = _fused_once(model, x)
    with torch.no_grad():
        assert_same_as_eager(out, model(x))
    (op,) = _ops(c)
    assert op_arguments(op)["mask"] is None and op_arguments(op)["max_offset"] == 0


def test_timm_vit_attention_without_mask():
    class Attention(nn.Module):  # timm's ViT attention (fused_attn)
        def __init__(self, dim=64, num_heads=4):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
            self.q_norm = self.k_norm = nn.Identity()

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, dropout_p=0.0)
            return self.proj(x.transpose(1, 2).reshape(b, n, c))

    model = Attention().eval()
    x = torch.randn(2, 17, 64)
    _, out = _fused_once(model, x)
    with torch.no_grad():
        assert_same_as_eager(out, model(x))


def test_cross_attention_with_key_padding():
    q = torch.randn(B, H, 13, D)
    _, k, v = _qkv()
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, 30:] = False
    fn = lambda q, k, v, keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # noqa: E731
    c, out = _fused_once(fn, q, k, v, padding)
    assert_same_as_eager(out, fn(q, k, v, padding))
    (op,) = _ops(c)
    assert tuple(op_arguments(op)["mask"].meta["val"].shape[-2:]) == (1, S), "the key padding reached the op as an S×S mask"
