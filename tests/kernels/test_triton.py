"""The Triton kernels (kernels/triton/), on a GPU or in Triton's interpreter.

Without CUDA, ``TRITON_INTERPRET=1`` must be set before Triton is first imported (tests/conftest.py
does it, before ``fa_dynamo`` pulls in ``torch._dynamo`` and with it ``triton.language``), so the
kernels that run on a GPU run here on CPU tensors. Accuracy is judged as in test_ops.py: error
against float64 at most ~2× eager PyTorch's error in the same dtype (3× for gradients). Sizes are
small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if triton is not imported yet

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fa_dynamo.kernels.triton import backward as triton_backward, configs as triton_configs, forward as triton_attention  # noqa: E402
from fa_dynamo.kernels.alibi import Alibi  # noqa: E402
from fa_dynamo.kernels.mask import Band, TileKind  # noqa: E402
from fa_dynamo.kernels.params import AttentionParams  # noqa: E402
from fa_dynamo.kernels.segments import Segments  # noqa: E402
from tests.kernels.test_alibi import _slopes, dense_alibi  # noqa: E402
from tests.kernels.test_ops import _case, _check_accuracy, eager_attention  # noqa: E402
from tests.kernels.test_segments import hidden_of, segment_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not (triton_attention.INTERPRETED and isinstance(tl.zeros, InterpretedFunction)):
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 set before triton is first imported",
                allow_module_level=True)

attention_triton = triton_attention.attention_triton
attention_triton_backward = triton_backward.attention_triton_backward


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _run(q, k, v, kw, scale, *, softcap=0.0, fill=float("-inf"), block_q=16, block_k=16):
    """``attention_triton`` on DEVICE; results back on the CPU."""
    out, lse = attention_triton(
        _dev(q), _dev(k), _dev(v), _dev(kw.get("bias")), _dev(kw.get("mask")), AttentionParams(
            scale=scale, softcap=softcap, fill=fill, band=Band(kw.get("lo"), kw.get("hi")), block_q=block_q,
            block_k=block_k),
    )
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    return out.cpu(), lse.cpu()


# --- the tiling-mask: loop bounds against mask.Band's classification ---------------------------


@triton.jit
def _ranges_kernel(Out, num_rows, num_cols, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    row_last = tl.minimum(row0 + BLOCK_M, num_rows) - 1
    start, full_start, full_end, end = triton_attention._tile_ranges(
        row0, row_last, num_cols, lo, hi, HAS_LO, HAS_HI, BLOCK_N)
    tl.store(Out + pid * 4 + 0, start)
    tl.store(Out + pid * 4 + 1, full_start)
    tl.store(Out + pid * 4 + 2, full_end)
    tl.store(Out + pid * 4 + 3, end)


@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(1, 70), num_cols=st.integers(1, 70),
    lo=st.one_of(st.none(), st.integers(-60, 20)), width=st.one_of(st.none(), st.integers(0, 60)),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
)
def test_loop_bounds_skip_empty_tiles_and_leave_full_tiles_unmasked(num_rows, num_cols, lo, width, blocks):
    hi = None if width is None else (width if lo is None else lo + width)
    band, (block_m, block_n) = Band(lo, hi), blocks
    n_blocks = triton.cdiv(num_rows, block_m)
    out = torch.empty(n_blocks * 4, dtype=torch.int32, device=DEVICE)
    _ranges_kernel[(n_blocks,)](out, num_rows, num_cols, lo or 0, hi or 0, lo is not None, hi is not None,
                                BLOCK_M=block_m, BLOCK_N=block_n)
    for b, (start, full_start, full_end, end) in enumerate(out.view(-1, 4).cpu().tolist()):
        q0, q1 = b * block_m, min((b + 1) * block_m, num_rows)
        visited_partial = set(range(start, full_start, block_n)) | set(range(full_end, end, block_n))
        visited_full = set(range(full_start, full_end, block_n))
        assert not visited_partial & visited_full
        for t0 in range(0, num_cols, block_n):
            kind = band.classify(q0, q1, t0, min(t0 + block_n, num_cols))
            if kind is TileKind.EMPTY:
                assert t0 not in visited_partial | visited_full, f"empty tile {t0} visited"
            elif t0 in visited_full:  # unmasked: fully visible and inside the key range
                assert kind is TileKind.FULL and t0 + block_n <= num_cols
            else:
                assert t0 in visited_partial, f"{kind} tile {t0} skipped"


def test_keys_in_empty_tiles_are_never_read():
    """NaN in keys no query may see (outside the band, whole tiles) leaves the kernel's own result
    unchanged. (The op then recomputes every row by the reference, which, like eager, gives NaN:
    0 · NaN in p·v.)"""
    q, k, v, _ = _case((1, 2, 1, 32, 128, 16, 16), masks="none")
    params = AttentionParams(scale=0.25, band=Band(-8, 0), block_q=16, block_k=16)
    clean, _ = triton_attention._forward(*map(_dev, (q, k, v)), None, None, params)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 32:], v2[:, :, 32:] = float("nan"), float("nan")
    poisoned, _ = triton_attention._forward(*map(_dev, (q, k2, v2)), None, None, params)
    assert not clean.isnan().any() and torch.equal(clean, poisoned)


# --- forward ------------------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([(1, 1), (4, 2), (3, 1)]),  # (q heads, kv heads)
    st.integers(1, 70),  # Sq
    st.integers(1, 70),  # Sk
    st.sampled_from([16, 24, 40, 64, 80]),  # D: powers of two and not
).map(lambda t: (t[0], t[1][0], t[1][1], t[2], t[3], t[4], t[4]))


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    masks=st.sampled_from(["none", "causal", "window", "bias", "mask", "causal+mask", "bias+window"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 64)]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(shape, masks, dtype, blocks, seed):
    q, k, v, kw = _case(shape, dtype, masks, seed)
    scale = shape[5] ** -0.5
    out, _ = _run(q, k, v, kw, scale, block_q=blocks[0], block_k=blocks[1])
    assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.dtype == dtype
    _check_accuracy(out, q, k, v, kw, scale)


@pytest.mark.parametrize(
    "shape, kw_extra",
    [
        ((2, 4, 2, 33, 57, 24, 40), {"lo": -9, "hi": 5}),  # Dv != D, odd sizes, sliding band
        ((1, 6, 1, 1, 97, 80, 80), {"hi": 96}),  # decode: one query, bottom-right causal
        ((1, 2, 2, 50, 20, 256, 256), {"hi": -30}),  # Sq > Sk: the first 30 rows see nothing
        ((1, 2, 1, 40, 40, 16, 16), {"mask_per_head": True}),
        ((2, 2, 2, 30, 45, 32, 32), {"key_padding": True}),
    ],
)
def test_shapes_and_masks(shape, kw_extra):
    q, k, v, kw = _case(shape, torch.float32)
    kw.update({n: kw_extra[n] for n in ("lo", "hi") if n in kw_extra})
    b, hq, _, sq, sk = shape[:5]
    if kw_extra.get("mask_per_head"):
        kw["mask"] = torch.rand(b, hq, sq, sk) > 0.5
    if kw_extra.get("key_padding"):
        kw["mask"] = (torch.arange(sk) >= torch.tensor([sk, sk - 11])[:, None])[:, None, None, :]
    out, lse = _run(q, k, v, kw, shape[5] ** -0.5)
    _check_accuracy(out, q, k, v, kw, shape[5] ** -0.5)
    assert (lse.isneginf() == out.isnan().all(-1)).all()


@pytest.mark.parametrize("shape, threads, expected", [
    ((1, 8, 1, 1, 3000, 32, 32), 4, (True, 2)),   # MQA decode: one problem, keys split across programs
    ((1, 4, 2, 3, 2500, 32, 32), 4, (True, 2)),   # speculative decoding: 2 · 3 rows per group
    ((2, 8, 2, 2, 300, 64, 64), 2, (True, 1)),    # 4 problems keep 2 units busy
    ((1, 4, 4, 1, 300, 32, 32), 2, (False, 1)),   # no groups: nothing to pack
    ((1, 4, 1, 20, 300, 32, 32), 2, (False, 1)),  # 80 packed rows: a long chunk
])
@pytest.mark.parametrize("masks", ["none", "causal", "window", "bias+window", "causal+mask"])
def test_decode_is_packed_and_split_and_exact(shape, threads, expected, masks, monkeypatch):
    """Short chunks of grouped heads run as one program per K/V head (rows = the group's heads ×
    the chunk's positions), split along the keys when the programs leave units idle."""
    launches = []
    real = triton_attention._launch

    def spy(kernel, grid_of, args, consts, *rest, **kw):
        launches.append((consts["PACKED"], grid_of({"BLOCK_M": 16, "BLOCK_N": 128})))
        return real(kernel, grid_of, args, consts, *rest, **kw)

    monkeypatch.setattr(triton_attention, "_launch", spy)
    if DEVICE == "cpu":  # the interpreter's units are the CPU threads
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, k, v, kw = _case(shape, torch.float32, masks, seed=shape[4])
    out, lse = _run(q, k, v, kw, shape[5] ** -0.5, block_q=16, block_k=128)
    _check_accuracy(out, q, k, v, kw, shape[5] ** -0.5)
    (packed, grid), = launches
    b, hq, hkv, sq = shape[:4]
    if DEVICE == "cpu":
        assert (packed, grid[2]) == expected
    assert grid[1] == b * (hkv if packed else hq)


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
def test_a_static_cache_hands_only_its_filled_slots_to_the_kernel(fill, monkeypatch):
    """Decode over a static cache: the keys the mask hides for every row (slots past the longest
    sequence's length) are cut before the launch; rows match float64 eager."""
    launched_keys = []
    real = triton_attention._launch

    def spy(kernel, grid_of, args, consts, *rest, **kw):
        launched_keys.append(args[1].shape[2])
        return real(kernel, grid_of, args, consts, *rest, **kw)

    monkeypatch.setattr(triton_attention, "_launch", spy)
    slots, lengths = 400, torch.tensor([230, 150])
    q, k, v, kw = _case((2, 8, 2, 1, slots, 32, 32), torch.float32, "none", seed=7)
    kw["mask"] = (torch.arange(slots) >= lengths[:, None])[:, None, None, :]
    kw["hi"] = slots  # the band of a decode row at the cache's end hides nothing
    out, _ = attention_triton(*map(_dev, (q, k, v)), None, _dev(kw["mask"]), AttentionParams(
        scale=0.2, fill=fill, band=Band(None, kw["hi"]), block_q=16, block_k=16))
    _check_accuracy(out.cpu(), q, k, v, kw, 0.2, fill=fill)
    assert launched_keys == [230]


@pytest.mark.parametrize("poison", ["value_hidden_by_the_mask", "value_in_a_cut_slot", "key_in_a_cut_slot",
                                    "query_row", "infinite_visible_key", "infinite_value_in_a_cut_slot"])
@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
def test_packed_decode_screens_only_the_cut_keys_and_is_nan_where_eager_is(poison, fill):
    """NaN and infinities in a static-cache decode call land in the rows eager gives them to,
    whether the kernel read them (its own arithmetic) or they sit in slots it cut (the screen)."""
    slots, filled = 300, 170
    q, k, v, _ = _case((1, 8, 2, 1, slots, 32, 32), torch.float32, "none", seed=11)
    mask = (torch.arange(slots) >= filled).expand(1, 1, 1, slots).clone()
    mask[..., 40] = True  # a hidden slot inside the kept range
    where = {"value_hidden_by_the_mask": (v, 1, 40), "value_in_a_cut_slot": (v, 0, 250),
             "key_in_a_cut_slot": (k, 1, 260), "query_row": (q, 3, 0), "infinite_visible_key": (k, 0, 7),
             "infinite_value_in_a_cut_slot": (v, 1, 200)}[poison]
    t, head, slot = where
    t[0, head, slot, 5] = float("inf") if poison.startswith("infinite") else float("nan")
    if poison == "infinite_visible_key":
        q[..., 5] = q[..., 5].abs()  # a score of +inf: exp(inf - inf) is NaN
    kw = {"mask": mask}
    out, _ = attention_triton(*map(_dev, (q, k, v)), None, _dev(mask), AttentionParams(
        scale=0.2, fill=fill, block_q=16, block_k=16))
    out = out.cpu()
    ref = eager_attention(q.double(), k.double(), v.double(), mask=mask, scale=0.2, fill=fill)
    assert ref.isnan().any() or poison == "key_in_a_cut_slot", "the poison reaches eager's output"
    assert torch.equal(out.isnan(), ref.isnan())
    _check_accuracy(out, q, k, v, kw, 0.2, fill=fill)


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min, -10.0])
def test_fully_masked_rows_follow_eager(fill):
    """-inf rows are NaN; finite-filled rows average V uniformly; small fills are not negligible."""
    q, k, v, _ = _case((2, 4, 2, 40, 30, 16, 16))
    mask = torch.rand(2, 1, 40, 30) > 0.5
    mask[0, :, 3] = True
    kw = {"mask": mask, "hi": -5}
    out, _ = _run(q, k, v, kw, 0.25, fill=fill, block_k=16)
    _check_accuracy(out, q, k, v, kw, 0.25, fill=fill)
    assert out[0, :, 3].isnan().all() == (fill == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(dtype):
    q, k, v, kw = _case((1, 4, 2, 45, 60, 32, 32), dtype, masks="causal+mask")
    out, _ = _run(q, k, v, kw, 0.2, softcap=3.0, block_q=32)
    _check_accuracy(out, q, k, v, kw, 0.2, softcap=3.0)


def test_lse_matches_float64():
    q, k, v, kw = _case((1, 2, 2, 37, 41, 16, 16), masks="bias+window")
    _, lse = _run(q, k, v, kw, 0.3)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3 + kw["bias"].double()
    j, i = torch.arange(41), torch.arange(37)[:, None]
    s = s.masked_fill(((j - i) < kw["lo"]) | ((j - i) > kw["hi"]), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_unserved_inputs_fall_back():
    q, k, v, kw = _case((1, 2, 2, 9, 9, 8, 8), torch.float64, masks="causal")
    out, _ = _run(q, k, v, kw, 0.35)  # float64: served by the CPU kernel, said once in the log
    _check_accuracy(out, q, k, v, kw, 0.35)


# --- backward -----------------------------------------------------------------------------------


def _grads(q, k, v, kw, go, scale, **extra):
    """(dq, dk, dv) of eager attention by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_attention(*leaves, scale=scale, **kw, **extra).backward(go)
    return [t.grad for t in leaves]


@pytest.mark.parametrize(
    "shape, masks, dtype, extra",
    [
        ((1, 4, 2, 37, 45, 24, 24), "causal", torch.float32, {}),
        ((2, 2, 1, 33, 50, 16, 40), "bias+window", torch.float32, {}),
        ((1, 2, 2, 40, 30, 16, 16), "causal+mask", torch.float32, {"fill": float("-inf")}),
        ((1, 2, 2, 40, 30, 16, 16), "mask", torch.float32, {"fill": -10.0}),
        ((1, 3, 1, 30, 30, 32, 32), "causal", torch.float32, {"softcap": 2.0}),
        ((1, 2, 1, 30, 26, 16, 16), "causal+mask", torch.float32, {"fill": float("-inf"), "softcap": 2.0}),
        ((1, 2, 1, 41, 39, 64, 64), "window", torch.float16, {}),
        ((1, 2, 2, 35, 35, 48, 48), "none", torch.bfloat16, {}),
    ],
)
def test_backward_matches_float64(shape, masks, dtype, extra):
    q, k, v, kw = _case(shape, dtype, masks, seed=3)
    if "mask" in masks and extra.get("fill") is not None:
        kw["mask"][0, :, 4] = True  # a fully masked row
        kw["hi"] = -3  # and rows the band hides entirely
    scale = shape[5] ** -0.5
    go = torch.randn(shape[0], shape[1], shape[3], shape[6]).to(dtype)
    band = Band(kw.get("lo"), kw.get("hi"))
    ours = attention_triton_backward(
        *map(_dev, (go, q, k, v, kw.get("bias"), kw.get("mask"))), AttentionParams(
            scale=scale, softcap=extra.get("softcap", 0.0), fill=extra.get("fill", float("-inf")), band=band,
            block_q=16, block_k=16), needs_bias_grad=False,
    )[:3]
    ours = [g.cpu() for g in ours]
    kw64 = {**kw, **({"bias": kw["bias"].double()} if "bias" in kw else {})}
    ref = _grads(q.double(), k.double(), v.double(), kw64, go.double(), scale, **extra)
    same = _grads(q, k, v, kw, go, scale, **extra)
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for name, a, r, e in zip("qkv", ours, ref, same):
        assert a.dtype == dtype and a.shape == r.shape
        assert torch.equal(a.isnan(), r.isnan()), f"d{name}: NaN pattern differs from eager"
        err = (a.double() - r).nan_to_num().abs().max().item()
        eager_err = (e.double() - r).nan_to_num().abs().max().item()
        assert err <= 3 * eager_err + floor, f"d{name}: error {err:.3g} vs eager's {eager_err:.3g}"


def test_backward_with_bias_gradient_uses_the_reference():
    q, k, v, kw = _case((1, 2, 2, 20, 20, 16, 16), masks="bias")
    go = torch.randn(1, 2, 20, 16)
    *grads, dbias, dslopes = attention_triton_backward(
        *map(_dev, (go, q, k, v, kw["bias"])), None, AttentionParams(scale=0.25, block_q=16), needs_bias_grad=True,
    )
    assert dbias is not None and dbias.shape == kw["bias"].shape
    assert dslopes is None


# --- segment masks (packed sequences, chunked attention) ------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "unsorted", "singletons"])
@pytest.mark.parametrize(
    "shape, masks, dtype",
    [((2, 4, 2, 37, 45, 16, 16), "causal", torch.float32), ((1, 2, 1, 33, 33, 24, 24), "window", torch.bfloat16)],
)
def test_segments_forward_and_backward_match_float64(layout, shape, masks, dtype):
    """Ids loaded per tile and compared: forward and the FA2 backward against the dense mask."""
    q, k, v, kw = _case(shape, dtype, masks, seed=5)
    q_ids, k_ids = segment_ids(layout, shape[0], shape[3], shape[4], seed=8)
    segments = Segments(_dev(q_ids), _dev(k_ids))
    scale = shape[5] ** -0.5
    band = Band(kw.get("lo"), kw.get("hi"))
    params = AttentionParams(scale=scale, band=band, block_q=16, block_k=16, segments=segments)
    out, _ = attention_triton(_dev(q), _dev(k), _dev(v), None, None, params)
    dense = {**kw, "mask": hidden_of(q_ids, k_ids)}
    _check_accuracy(out.cpu(), q, k, v, dense, scale)
    go = torch.randn(out.shape).to(dtype)
    ours = attention_triton_backward(
        *map(_dev, (go, q, k, v)), None, None, params, needs_bias_grad=False,
    )[:3]
    ref = _grads(q.double(), k.double(), v.double(), dense, go.double(), scale)
    same = _grads(q, k, v, dense, go, scale)
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, a, r, e in zip("qkv", (g.cpu() for g in ours), ref, same):
        assert torch.equal(a.isnan(), r.isnan()), f"d{name}: NaN pattern differs from eager"
        err = (a.double() - r).nan_to_num().abs().max().item()
        eager_err = (e.double() - r).nan_to_num().abs().max().item()
        assert err <= 3 * eager_err + floor, f"d{name}: error {err:.3g} vs eager's {eager_err:.3g}"


def test_tiles_of_other_segments_are_never_read():
    """With sorted ids, key tiles holding no id of a query tile's rows are skipped: NaN in them
    leaves the kernel's own forward and dq/dk/dv of the other keys unchanged."""
    q, k, v, _ = _case((1, 2, 1, 64, 64, 16, 16), masks="none", seed=1)
    ids = torch.arange(64).div(32, rounding_mode="floor")[None]  # two packed sequences of 32
    segments = Segments(_dev(ids), _dev(ids))
    params = AttentionParams(scale=0.25, block_q=16, block_k=16, segments=segments)
    clean, lse = triton_attention._forward(*map(_dev, (q, k, v)), None, None, params)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:], v2[:, :, 40:] = float("nan"), float("nan")  # keys of the second sequence
    poisoned, _ = triton_attention._forward(*map(_dev, (q, k2, v2)), None, None, params)
    assert not clean.isnan().any()
    assert torch.equal(clean[:, :, :32], poisoned[:, :, :32])
    go = _dev(torch.randn(clean.shape))
    args = (go, *map(_dev, (q, k, v)), None, None, clean, lse, 0.25, 0.0, float("-inf"), None, None, 16, 16)
    grads = torch.ops.fa_dynamo.attention_triton_backward(*args, q_segments=segments.q, k_segments=segments.k)
    args2 = (go, *map(_dev, (q, k2, v2)), None, None, clean, lse, 0.25, 0.0, float("-inf"), None, None, 16, 16)
    grads2 = torch.ops.fa_dynamo.attention_triton_backward(*args2, q_segments=segments.q, k_segments=segments.k)
    assert torch.equal(grads[0][:, :, :32], grads2[0][:, :, :32]), "dq of the first sequence read other keys"
    for g, g2 in zip(grads[1:], grads2[1:]):
        assert torch.equal(g[:, :, :32], g2[:, :, :32]), "dk/dv of the first sequence's keys changed"


def _structure_kwargs(kind: str) -> dict:
    if kind == "segments":
        q_ids, k_ids = (_dev(t) for t in segment_ids("packed", 2, 21, 29, seed=2))
        return {"q_segments": q_ids, "k_segments": k_ids}
    return {"alibi_slopes": _dev(_slopes(2, 4, "bh"))}


@pytest.mark.parametrize("kind", ["segments", "alibi"])
def test_structures_through_the_custom_ops(kind):
    """fa_dynamo::attention with kernel='triton' and segment ids or ALiBi slopes; both custom ops
    pass opcheck."""
    q, k, v, kw = _case((2, 4, 2, 21, 29, 16, 16), masks="causal")
    q, k, v = (_dev(t).requires_grad_() for t in (q, k, v))
    extra = _structure_kwargs(kind)
    args = (q, k, v, None, None, 0.25, 0.0, float("-inf"), None, kw["hi"], "triton", 16, 16)
    torch.library.opcheck(torch.ops.fa_dynamo.attention.default, args, extra)
    out, lse = torch.ops.fa_dynamo.attention(*args, **extra)
    go = torch.randn_like(out)
    bwd_args = (go, q.detach(), k.detach(), v.detach(), None, None, out.detach(), lse, 0.25, 0.0, float("-inf"),
                None, kw["hi"], 16, 16)
    torch.library.opcheck(torch.ops.fa_dynamo.attention_triton_backward.default, bwd_args, extra)


# --- structural ALiBi ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, masks, dtype, form",
    [((2, 4, 2, 37, 45, 16, 16), "causal", torch.float32, "bh"), ((1, 3, 1, 33, 40, 24, 24), "window", torch.bfloat16, "h"),
     ((1, 2, 2, 20, 50, 16, 16), "bias+mask", torch.float32, "11")],
)
def test_alibi_forward_and_backward_match_float64(shape, masks, dtype, form):
    """The slope times the tile's index difference, added in the kernels: forward and the FA2
    backward against the bias written out."""
    q, k, v, kw = _case(shape, dtype, masks, seed=6)
    slopes = _slopes(shape[0], shape[1], form)
    alibi = Alibi(_dev(slopes if slopes.dim() == 2 else slopes[None]))
    scale, band = shape[5] ** -0.5, Band(kw.get("lo"), kw.get("hi"))
    params = AttentionParams(scale=scale, band=band, block_q=16, block_k=16, alibi=alibi)
    out, _ = attention_triton(_dev(q), _dev(k), _dev(v), _dev(kw.get("bias")), _dev(kw.get("mask")), params)
    bias = dense_alibi(slopes, shape[3], shape[4]) + (kw["bias"].float() if "bias" in kw else 0)
    dense = {**kw, "bias": bias.to(dtype)}
    _check_accuracy(out.cpu(), q, k, v, {**dense, "bias": bias.double() if dtype == torch.float64 else dense["bias"]},
                    scale)
    go = torch.randn(out.shape).to(dtype)
    ours = attention_triton_backward(
        *map(_dev, (go, q, k, v, kw.get("bias"), kw.get("mask"))), params, needs_bias_grad=False,
    )[:3]
    ref = _grads(q.double(), k.double(), v.double(), {**kw, "bias": bias.double()}, go.double(), scale)
    same = _grads(q, k, v, dense, go, scale)
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, a, r, e in zip("qkv", (g.cpu() for g in ours), ref, same):
        err = (a.double() - r).nan_to_num().abs().max().item()
        eager_err = (e.double() - r).nan_to_num().abs().max().item()
        assert err <= 3 * eager_err + floor, f"d{name}: error {err:.3g} vs eager's {eager_err:.3g}"


# --- per-architecture configs -------------------------------------------------------------------


@pytest.mark.parametrize("capability, name", [((7, 0), "sm70"), ((7, 5), "sm75"), ((8, 0), "sm80"),
                                              ((8, 6), "sm86"), ((8, 9), "sm89"), ((9, 0), "sm90")])
def test_configs_fit_each_architecture(capability, name):
    arch = triton_configs.arch_for(capability)
    assert arch.name == name
    for head_dim in (16, 64, 128, 256):
        problem = triton_configs.Problem(head_dim, head_dim, elem_bytes=2, bias_bytes=2, has_mask=True)
        for backward in (False, True):
            configs = triton_configs.configs_for(arch, problem, backward=backward)
            assert configs
            if head_dim <= 128:  # huge head dims may only have the 1-stage fallback
                assert all(triton_configs.fits_shared_memory(c, problem, arch, backward) for c in configs)
    assert triton_configs.arch_for((6, 1)) is None
    assert triton_configs.unsupported_reason(triton_configs.ARCHS["sm75"], "bfloat16")
    assert triton_configs.unsupported_reason(triton_configs.ARCHS["sm80"], "bfloat16") is None


def test_config_caps_and_interpreter_tiles():
    arch = triton_configs.ARCHS["sm80"]
    problem = triton_configs.Problem(64, 64, elem_bytes=2)
    assert all(c.block_m <= 64 and c.block_n <= 32 for c in
               triton_configs.configs_for(arch, problem, max_block_m=64, max_block_n=32))
    assert triton_configs.interpreter_config(256, 512) == triton_configs.TileConfig(128, 128, 1, 4)
    assert triton_configs.interpreter_config(20, 8) == triton_configs.TileConfig(16, 16, 1, 4)
    assert math.isclose(triton_configs.shared_memory_bytes(
        triton_configs.TileConfig(64, 64, 2, 4), triton_configs.Problem(64, 64, 2)), 64 * 64 * 2 + 2 * 64 * 128 * 2)


# --- the custom ops -----------------------------------------------------------------------------


def test_backward_op_opcheck():
    """The backward kernels run inside fa_dynamo::attention_triton_backward (fake impl, schema)."""
    q, k, v, kw = _case((1, 4, 2, 19, 23, 16, 16), masks="causal+mask")
    q, k, v, mask = (_dev(t) for t in (q, k, v, kw["mask"]))
    out, lse = attention_triton(q, k, v, None, mask, AttentionParams(scale=0.3, band=Band(None, kw["hi"]), block_q=16,
                                                                     block_k=16))
    go = torch.randn_like(out)
    args = (go, q, k, v, None, mask, out, lse, 0.3, 0.0, float("-inf"), None, kw["hi"], 16, 16)
    torch.library.opcheck(torch.ops.fa_dynamo.attention_triton_backward.default, args)


def _op_dispatches_triton() -> bool:
    from fa_dynamo.kernels import ops

    return hasattr(ops, "_wants_triton")


@pytest.mark.skipif(not _op_dispatches_triton(), reason="ops._run_kernel does not dispatch to triton yet")
def test_custom_op_runs_the_triton_kernels(monkeypatch):
    """fa_dynamo::attention with kernel='triton': forward, backward and opcheck go through the kernels."""
    import fa_dynamo

    launched = []
    launch = triton_attention._launch
    def record(kernel, *args, **kwargs):
        launched.append(kernel.fn.__name__)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(triton_attention, "_launch", record)
    monkeypatch.setattr(triton_backward, "_launch", record)
    q, k, v, kw = _case((1, 4, 2, 33, 47, 32, 32), masks="causal+mask")
    leaves = [_dev(t).requires_grad_() for t in (q, k, v)]
    out = fa_dynamo.attention(*leaves, mask=_dev(kw["mask"]), scale=0.2, max_offset=kw["hi"], kernel="triton",
                              block_q=16, block_k=16)
    out.backward(torch.ones_like(out))
    assert launched == ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    _check_accuracy(out.detach().cpu(), q, k, v, kw, 0.2)
    grads = _grads(q, k, v, kw, torch.ones(out.shape), 0.2)
    ref = _grads(q.double(), k.double(), v.double(), kw, torch.ones(out.shape, dtype=torch.float64), 0.2)
    for leaf, g, r in zip(leaves, grads, ref):
        err, eager_err = ((t.double() - r).nan_to_num().abs().max() for t in (leaf.grad.cpu(), g))
        assert err <= 3 * eager_err + 1e-5
    args = (leaves[0], leaves[1], leaves[2], None, _dev(kw["mask"]), 0.2, 0.0, float("-inf"), None, kw["hi"],
            "triton", 16, 16)
    torch.library.opcheck(torch.ops.fa_dynamo.attention.default, args)


_AOT_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fa_dynamo.kernels.triton import backward as tb, forward as ta

assert not ta.INTERPRETED
backend, arch, kernel, dtype = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
fn = {"fwd": ta._attn_fwd, "dkdv": tb._attn_bwd_dkdv, "dq": tb._attn_bwd_dq}[kernel]
consts = dict(HEAD_DIM=80, HEAD_DIM_V=80, BLOCK_D=128, BLOCK_DV=128, HAS_LO=True, HAS_HI=True, HAS_BIAS=True,
              HAS_MASK=True, HAS_SEG=True, HAS_ALIBI=True, SEG_SKIP=True, SOFTCAP=True, LIBDEVICE=True, DOT_F32=False,
              PRECISION="ieee" if dtype == "fp32" else None, BLOCK_M=64 if kernel == "fwd" else 32, BLOCK_N=32)
if kernel == "fwd":
    consts.update(PACKED=True, SPLIT=True)  # decode: GQA packing and split-K
pointers = {"Mask": "*u8", "QSeg": "*i64", "KSeg": "*i64", "Slopes": "*fp32", "SegRuns": "*i32", "Lse": "*fp32",
            "Delta": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32"}
signature = {n: "constexpr" if n in consts else pointers.get(n, f"*{dtype}") if n[0].isupper() and n not in
             ("Q_CLASS", "K_CLASS") else "fp32" if n in ("scale", "softcap") else "i32" for n in fn.arg_names}
target = GPUTarget(backend, int(arch) if backend == "cuda" else arch, 32 if backend == "cuda" else 64)
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                          options={"num_warps": 4, "num_stages": 1})
print("shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend, arch", [("cuda", "70"), ("cuda", "75"), ("cuda", "80"), ("cuda", "90"),
                                           ("hip", "gfx942")])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_kernels_compile_for_gpu_targets(backend, arch, kernel, request):
    """Ahead-of-time compilation (no GPU needed): every mask feature on (and the forward's decode
    packing and split-K), head dim 80 padded to 128."""
    import subprocess
    import sys

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: compiles the kernels for GPU targets (minutes); run with -m slow")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dtype = "fp16" if arch in ("70", "75") else "bf16"
    result = subprocess.run([sys.executable, "-c", _AOT_COMPILE, backend, arch, kernel, dtype], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shared" in result.stdout
