"""Hypothesis strategies that write SDPA programs: ``F.scaled_dot_product_attention`` calls in the
forms models make them, as sources of the same shape as ``programs.py``'s (the harness runs both).

Drawn: the mask (none; a bool or float dense mask, with a row that sees no key; bool or additive
key padding ``[B, 1, 1, Sk]``; a causal or sliding-window bool mask built from ``arange``
comparisons, bottom-right aligned as transformers builds it, expanded to ``[B, 1, Sq, Sk]``, ANDed
with key padding), ``is_causal`` (top-left, Sq ≠ Sk included), ``scale``, GQA
(``enable_gqa``, ``repeat_kv``, ``repeat_interleave``, broadcasting one K/V head), the operand
layout (BHSD, or BSHD projections transposed), float32 / bfloat16 / float64, bfloat16 autocast,
Sq = 1, Dv ≠ D, dynamic shapes, gradients, kernels and tile sizes. Every drawn program is
attention and must fuse; SDPA gives 0 for a row with no visible key, and so must the op.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz.programs import HEAD_DIMS, HEADS, MAX_SEQ, OPTIONS, Program, Writer

SDPA_MASKS = ("none", "dense_bool", "dense_float", "key_padding_bool", "key_padding_additive", "causal_hf",
              "window_hf", "causal_hf_and_padding")
GQA_FORMS = ("enable_gqa", "repeat_kv", "repeat_interleave")


@st.composite
def sdpa_programs(draw) -> Program:
    dtype = draw(st.sampled_from(("float32", "float32", "bfloat16", "float64")))
    w = Writer(dtype)
    if dtype == "float32" and draw(st.integers(0, 7)) == 0:
        w.autocast = "bfloat16"
        w.tag("autocast", w.autocast)
    hq, hkv = draw(st.sampled_from(HEADS))
    mask = draw(st.sampled_from(SDPA_MASKS))
    # with a mask too, eager accepts is_causal only where its CPU flash kernel serves the call (the
    # math kernel raises): tests/passes/test_sdpa.py covers that form
    is_causal = draw(st.booleans()) if mask == "none" else False
    layout = draw(st.sampled_from(("bhsd", "bshd")))
    w.tag("mask", mask), w.tag("is_causal", is_causal), w.tag("layout", layout)

    for name, heads, length, dim in (("q", "hq", "sq", "d"), ("k", "hkv", "sk", "d"), ("v", "hkv", "sk", "dv")):
        if layout == "bhsd":
            w.add_input(name, f"randn(gen, b, {heads}, {length}, {dim})")
        else:  # projections come out [B, S, H, D]: the call reads their transposes
            w(f"{name} = {w.add_input(name + '_proj', f'randn(gen, b, {length}, {heads}, {dim})')}.transpose(1, 2)")
    kwargs = []
    if hq != hkv:
        gqa = draw(st.sampled_from(GQA_FORMS + (("broadcast",) if hkv == 1 else ())))
        w.tag("gqa", gqa)
        if gqa == "enable_gqa":
            kwargs.append("enable_gqa=True")
        elif gqa == "repeat_kv":
            w.helpers.add("repeat_kv")
            w(f"k, v = repeat_kv(k, {hq // hkv}), repeat_kv(v, {hq // hkv})")
        elif gqa == "repeat_interleave":
            w(f"k, v = k.repeat_interleave({hq // hkv}, dim=1), v.repeat_interleave({hq // hkv}, dim=1)")

    attn_mask = _render_mask(draw, w, mask)
    if attn_mask:
        kwargs.insert(0, f"attn_mask={attn_mask}")
    if is_causal:
        kwargs.append("is_causal=True")
    scale = draw(st.sampled_from((None, "0.3", "1.0 / math.sqrt(q.shape[-1])", "2.0")))
    if scale is not None:
        kwargs.append(f"scale={scale}")
        w.tag("scale", scale)
    w(f"out = F.scaled_dot_product_attention(q, k, v{''.join(', ' + a for a in kwargs)})")
    if draw(st.booleans()):
        w("out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)")  # merge heads, as models do

    d = draw(st.sampled_from(HEAD_DIMS))
    dv = d if draw(st.booleans()) else draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.integers(1, 2))
    dynamic = draw(st.integers(0, 6)) == 0
    shapes = []
    for _ in range(2 if dynamic else 1):
        sq = draw(st.one_of(st.integers(1, MAX_SEQ), st.just(1)))
        sk = draw(st.integers(1, MAX_SEQ))
        shapes.append(dict(b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv))
    grad = dtype != "bfloat16" and w.autocast is None and draw(st.integers(0, 3)) == 0
    options = draw(st.sampled_from(OPTIONS + ({"kernel": "triton", "block_q": 16, "block_k": 16},)))
    if options:
        w.tag("options", "/".join(f"{key}={val}" for key, val in options.items()))
    return Program(w.source(True, True, grad, dynamic, shapes, options), True, True, tuple(w.tags))


def _render_mask(draw, w: Writer, kind: str) -> str:
    """Writes the mask's inputs and lines; returns the ``attn_mask`` expression ('' for none)."""
    if kind == "none":
        return ""
    if kind in ("dense_bool", "dense_float"):
        heads = draw(st.sampled_from(("1", "hq")))
        w.add_input("keep", f"torch.rand(b, {heads}, sq, sk, generator=gen) > 0.4")
        w("keep = keep.clone()")
        w("keep[0, :, 0] = False  # a row with no visible key: SDPA gives 0")
        if kind == "dense_bool":
            return "keep"
        w.add_input("bias", f"randn(gen, b, {heads}, sq, sk)")
        return "bias.to(q.dtype).masked_fill(~keep, NEG_INF)"
    w.add_input("lengths", "torch.randint(0, sk + 1, (b, 1), generator=gen)")
    w("padding = torch.arange(k.shape[-2])[None, :] < lengths  # [B, Sk], True = a real token")
    if kind == "key_padding_bool":
        return "padding[:, None, None, :]"
    if kind == "key_padding_additive":
        fill = draw(st.sampled_from(("NEG_INF", "torch.finfo(q.dtype).min")))
        w.tag("fill", fill)
        return f"torch.zeros(padding.shape, dtype=q.dtype).masked_fill(~padding, {fill})[:, None, None, :]"
    # transformers' masks: bottom-right aligned (the queries are the last Sq positions)
    w("i = torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])")
    w("j = torch.arange(k.shape[-2])[None, :]")
    visible = "j <= i"
    if kind == "window_hf":
        window = draw(st.integers(1, 9))
        w.tag("window", window)
        visible = f"(j <= i) & (j > i - {window})"
    w(f"visible = ({visible})[None, None].expand(q.shape[0], 1, -1, -1)")
    if kind == "causal_hf_and_padding":
        w("visible = visible & padding[:, None, None, :]")
    return "visible"
