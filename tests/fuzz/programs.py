"""Hypothesis strategies that write attention programs as Python source.

A generated program is a complete, self-contained module (the shape below); the harness
(``tests.fuzz.harness``) ``exec``s it, builds the inputs, and compares the compiled function
with eager. Sources are what hypothesis shrinks, what a failure prints, and what
``tests/fuzz/regressions.py`` stores::

    '''attention: qk=einsum mask=causal softmax=F.softmax ...'''
    import math
    import torch
    import torch.nn.functional as F

    IS_ATTENTION = True     # the backend is expected to see attention here
    EXPECT_FUSED = True     # ... and to replace it with fa_dynamo::attention
    DTYPE = torch.float32
    GRAD = False            # also compare gradients
    DYNAMIC = False         # torch.compile(dynamic=True), run on every SHAPES entry
    SHAPES = [dict(b=2, hq=4, hkv=2, sq=5, sk=7, d=13, dv=13)]
    OPTIONS = {'block_q': 5, 'block_k': 3}   # optional: backend options (tiles, kernel)
    AUTOCAST = torch.bfloat16  # optional: the body runs under torch.autocast in this dtype

    def make_inputs(gen, b, hq, hkv, sq, sk, d, dv):
        ...
        return q, k, v, pad

    def program(q, k, v, pad):
        ...

Two families:

* ``attention_programs()``: every spelling of ``softmax(Q·Kᵀ ⊕ scale ⊕ softcap ⊕ masks)·V`` the
  README promises to fuse. Q·Kᵀ by ``@`` / ``matmul`` / ``bmm`` over ``[b*h, s, d]`` reshapes /
  ``baddbmm`` / einsum (BHSD, BSHD, ellipsis), with Kᵀ as ``.mT``, ``transpose``, ``permute``,
  ``swapaxes`` or a pre-transposed input; inputs BHSD, BSHD, or one packed ``[b, s, 3, h, d]``
  projection. Scale on q, k, both or the scores, by mul or div, literals or ``math.sqrt(d)``.
  Masks, up to three: causal with any offset and sliding windows built from
  ``triu``/``tril`` of ``full``/``ones``/``new_ones``, ``arange`` comparisons, ``where``, sliced
  buffers, HF-style 4-D expands; additive or boolean dense inputs; key padding (bool, int,
  BERT-style additive), query padding, packed-sequence segments, prefix-LM, a band ANDed with
  padding, ALiBi computed in the graph; fills ``-inf``, ``finfo.min``, other constants, GPT-2's
  0-d tensor fill. Softmax by ``torch.softmax`` / ``F.softmax`` / method / ``_softmax``, with
  fp32 casts, ``_safe_softmax``, or by hand. Eval dropout, GQA (``repeat_kv``,
  ``repeat_interleave``, broadcasting), in-place score ops, a second attention site, Sq ≠ Sk,
  Sq = 1, odd head dims, Dv ≠ D, float32 / bfloat16 / float64, bfloat16 / float16 autocast, dynamic
  shapes, gradients, and small kernel tiles or other kernels (``OPTIONS``) so that the kernel's
  tiling runs on the masks real programs build.
  ``IS_ATTENTION`` and ``EXPECT_FUSED`` are True (``_safe_softmax`` included: the op's
  ``zero_empty_rows`` gives its 0 for a row with no visible key). The hand-written max/exp/sum softmax
  is expected to fuse (``fa_dynamo.passes.attention.manual_softmax`` reads it as ``aten.softmax``).
* ``near_miss_programs()``: look like attention but are not (or are not expressible by the
  op): softmax over another dim or of transposed scores, a transform of the probabilities,
  probabilities or scores also used, a per-head or tensor scale, a permute that is not a
  transpose, a scale or bias after a finite fill, a tensor fill value, masks that broadcast in
  ways a band cannot describe (a one-row mask expanded, a mask indexed by head), GQA on K but
  not V (or from different head counts), in-place writes to a scaled operand or to the source of
  a copy the pass would read instead, lossy casts of scores or probabilities, a negative
  softcap. ``IS_ATTENTION`` is False: the compiled result must equal eager; fusing is allowed
  only when exactly equivalent.

Choices are drawn simplest-first so that hypothesis shrinks towards plain ``q @ k.mT`` programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from tests.fuzz.masks import (
    INDEX_FORMS, NEEDS_4D, NEEDS_SQUARE, draw_fill, draw_mask_kinds, masked_fill_ok, render_masks,
)

MAX_SEQ = 40  # longest generated sequence (shorter than masks.BUFFER)

DTYPES = ("float32", "float32", "bfloat16", "float64")
HEADS = ((1, 1), (2, 2), (4, 4), (4, 2), (4, 1), (6, 3), (3, 1), (6, 2))
HEAD_DIMS = (8, 16, 13, 24, 33, 64)

# fills: (source expression, is -inf, finite value of magnitude >= 1e30 or None)

HEADER = '''import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
'''

HELPERS = {
    "randn": '''def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DTYPE)
''',
    "repeat_kv": '''def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
''',
}


@dataclass(frozen=True)
class Program:
    """A generated program: its source and the tags used for statistics."""

    source: str
    is_attention: bool
    expect_fused: bool
    tags: tuple = ()


@dataclass
class Writer:
    """Accumulates one program: inputs, body lines, helpers and tags."""

    dtype: str
    inputs: list = field(default_factory=list)  # (name, expression in make_inputs)
    body: list = field(default_factory=list)
    helpers: set = field(default_factory=lambda: {"randn"})
    tags: list = field(default_factory=list)
    returns: str = "out"
    autocast: str | None = None  # the body runs under torch.autocast("cpu", dtype=torch.<autocast>)
    buffer: list | None = None  # while set, lines go here (masks are reordered before joining the body)

    @property
    def scores_dtype(self) -> str:
        return self.autocast or self.dtype

    def __call__(self, line: str) -> None:
        (self.body if self.buffer is None else self.buffer).append(line)

    def inputs_named(self, name: str) -> bool:
        return any(n == name for n, _ in self.inputs)

    def add_input(self, name: str, expr: str) -> str:
        self.inputs.append((name, expr))
        return name

    def tag(self, key: str, value) -> None:
        self.tags.append(f"{key}={value}")

    def source(self, is_attention, expect_fused, grad, dynamic, shapes, options=None) -> str:
        names = ", ".join(n for n, _ in self.inputs)
        doc = ("attention" if is_attention else "near-miss") + ": " + " ".join(self.tags)
        parts = [f'"""{doc}"""', HEADER]
        parts.append(
            f"IS_ATTENTION = {is_attention}\nEXPECT_FUSED = {expect_fused}\nDTYPE = torch.{self.dtype}\n"
            f"GRAD = {grad}\nDYNAMIC = {dynamic}\nSHAPES = [{', '.join(_shape_src(s) for s in shapes)}]\n"
            + (f"OPTIONS = {options!r}  # backend options\n" if options else "")
            + (f"AUTOCAST = torch.{self.autocast}\n" if self.autocast else "")
        )
        for h in sorted(self.helpers):
            parts.append("\n" + HELPERS[h])
        make = ["def make_inputs(gen, b, hq, hkv, sq, sk, d, dv):"]
        make += [f"    {n} = {e}" for n, e in self.inputs]
        make.append(f"    return {names}" + ("," if len(self.inputs) == 1 else ""))
        parts.append("\n" + "\n".join(make) + "\n")
        body = self.body + [f"return {self.returns}"]
        if self.autocast:
            body = ['with torch.autocast("cpu", dtype=AUTOCAST):'] + [f"    {ln}" for ln in body]
        prog = [f"def program({names}):"] + [f"    {ln}" for ln in body]
        parts.append("\n" + "\n".join(prog) + "\n")
        return "\n".join(parts)


def _shape_src(s: dict) -> str:
    return "dict(" + ", ".join(f"{k}={v}" for k, v in s.items()) + ")"


# --- shapes -------------------------------------------------------------------------------------


def _draw_shapes(draw, heads, *, square=False, sq_one=False, dynamic=False, sk_is=None):
    """One shape dict (two for dynamic programs, differing in sequence lengths)."""
    hq, hkv = heads
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = d if draw(st.booleans()) else draw(st.sampled_from(HEAD_DIMS))
    b = draw(st.integers(1, 2))
    shapes = []
    for _ in range(2 if dynamic else 1):
        sq = 1 if sq_one else draw(st.one_of(st.integers(1, MAX_SEQ), st.just(1)))  # decode: Sq = 1
        sk = sq if square else draw(st.integers(1, MAX_SEQ))
        if sk_is is not None:
            sk = sk_is(hq, b)
        shapes.append(dict(b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv))
    return shapes


# --- pieces shared by both families --------------------------------------------------------------


def _scale_value(draw, how: str) -> str:
    if how == "mul":
        return draw(st.sampled_from(["0.125", "q.shape[-1] ** -0.5", "1 / math.sqrt(q.shape[-1])", "0.3", "1.0 / math.sqrt(D)"]))
    return draw(st.sampled_from(["math.sqrt(q.shape[-1])", "8.0", "q.shape[-1] ** 0.5", "math.sqrt(D)"]))


def _scaled(draw, x: str, how: str, c: str) -> str:
    if how == "mul":
        return draw(st.sampled_from([f"{x} * {c}", f"{c} * {x}", f"{x}.mul({c})", f"torch.mul({x}, {c})"]))
    return draw(st.sampled_from([f"{x} / {c}", f"{x}.div({c})", f"torch.div({x}, {c})"]))


# --- attention programs ----------------------------------------------------------------------------


QK_SPELLINGS = ("matmul", "einsum", "bmm", "einsum_bshd", "matmul_pretransposed", "matmul_bshd") * 2 + (
    "einsum_ellipsis", "baddbmm")
SOFTMAXES = (
    "torch.softmax(s, dim=-1)", "torch._softmax(s, -1, False)", "F.softmax(s, dim=-1)", "s.softmax(-1)",
    "s.softmax(dim=LAST)", "torch.softmax(s, -1)",
    "F.softmax(s.float(), dim=-1).to(v.dtype)", "F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)",
    "torch.softmax(s.float(), -1).type_as(v)", "torch.ops.aten._safe_softmax(s, -1)", "manual",
)
DROPOUTS = ("", "F.dropout(p, p=0.1, training=False)", "F.dropout(p, 0.0)", "torch.dropout(p, 0.2, False)")
KT_FORMS = ("k.transpose(-2, -1)", "k.mT", "k.transpose(-1, -2)", "k.transpose(2, 3)", "k.permute(0, 1, 3, 2)",
            "k.swapaxes(-2, -1)")
EINSUM_LETTERS = ("bhqkd", "bnijc", "zystu")
OPTIONS = (None, None, {"block_q": 8, "block_k": 8}, {"block_q": 5, "block_k": 3}, {"block_q": 16, "block_k": 4},
           {"kernel": "sdpa", "block_q": 4}, {"kernel": "reference"})


@st.composite
def attention_programs(draw) -> Program:
    """A program that is attention (see the module docstring)."""
    return _compose(draw, near=None)


NEAR_MISSES = (
    "softmax_dim", "after_softmax", "probs_returned", "probs_reused", "scores_returned", "scores_reused",
    "per_head_scale", "tensor_scale", "permute_not_transpose", "scale_after_finite_fill", "bias_after_finite_fill",
    "fill_tensor", "row_broadcast_mask", "head_indexed_mask", "mutated_scaled_q", "k_only_gqa", "v_only_gqa",
    "mismatched_gqa", "downcast_scores", "transposed_probs", "softmax_transposed", "write_after_copy",
    "negative_softcap", "downcast_probs",
)


@st.composite
def near_miss_programs(draw) -> Program:
    """A program that looks like attention but is not (see the module docstring)."""
    return _compose(draw, near=draw(st.sampled_from(NEAR_MISSES)))


def programs() -> st.SearchStrategy:
    """Attention programs (about three in four) and near-misses."""
    return st.one_of(attention_programs(), attention_programs(), attention_programs(), near_miss_programs())


@dataclass
class _Draft:
    """What the phases of ``_compose`` have drawn so far, read and added to phase by phase."""

    near: str | None

    def get(self, *names):
        return tuple(getattr(self, n) for n in names)


def _compose(draw, near):
    """One program: the phases below, in this order (each draws, then writes its part)."""
    dtype = draw(st.sampled_from(DTYPES))
    if near in ("downcast_scores", "downcast_probs") and dtype == "bfloat16":
        dtype = "float32"
    copied = draw(st.sampled_from(["repeat", "scale", "mask"])) if near == "write_after_copy" else None
    w = Writer(dtype)
    if near:
        w.tag("near", near)
    if dtype == "float32" and near is None and draw(st.integers(0, 9)) == 0:
        w.autocast = draw(st.sampled_from(["bfloat16", "float16"]))
        w.tag("autocast", w.autocast)
    d = _Draft(near)
    d.__dict__.update(copied=copied, dtype=dtype, w=w)
    _draw_structure(draw, d)
    _write_inputs(draw, d)
    _write_gqa(draw, d)
    _write_scale(draw, d)
    _write_scores(draw, d)
    _write_softcap(draw, d)
    _write_masks(draw, d)
    _write_softmax(draw, d)
    return _write_pv(draw, d)


def _draw_structure(draw, d: _Draft):
    """The structure first (it constrains the shapes), then the shapes and the fill."""
    copied, dtype, near, w = d.get('copied', 'dtype', 'near', 'w')
    # structure first (constraints on shapes), shapes last
    simple = near is not None
    qk = "matmul" if simple else draw(st.sampled_from(QK_SPELLINGS))
    heads = draw(st.sampled_from(HEADS))
    if near in ("k_only_gqa", "v_only_gqa", "mismatched_gqa") or copied == "repeat":
        heads = draw(st.sampled_from([(4, 2), (4, 1), (6, 3), (6, 2), (2, 1)]))
    if near in ("permute_not_transpose", "per_head_scale", "head_indexed_mask"):
        heads = (heads[0], heads[0]) if heads[0] > 1 else (2, 2)
    gqa = "none"
    if copied == "repeat":
        gqa = "copied"
    elif heads[0] != heads[1] and near not in ("k_only_gqa", "v_only_gqa", "mismatched_gqa"):
        options = ["repeat_kv", "repeat_interleave"] + (["broadcast"] if heads[1] == 1 and qk.startswith("matmul") else [])
        if qk in ("einsum_bshd", "matmul_bshd"):
            options = ["repeat_interleave"] + (["broadcast"] if qk == "matmul_bshd" and heads[1] == 1 else [])
        gqa = draw(st.sampled_from(options))
    layout = "bhsd"
    if qk in ("einsum_bshd", "matmul_bshd"):
        layout = "bshd"
    elif qk in ("matmul", "einsum", "bmm", "baddbmm") and not simple:
        layout = draw(st.sampled_from(["bhsd", "bshd", "bhsd", "packed"]))
        if layout == "packed":  # one [b, s, 3, h, d] projection output (ViT / GPT-NeoX style)
            heads, gqa = (heads[0], heads[0]), "none"
    kinds = [] if near in ("head_indexed_mask", "row_broadcast_mask") else draw_mask_kinds(draw)
    if near in ("scale_after_finite_fill", "bias_after_finite_fill", "fill_tensor") and not kinds:
        kinds = ["causal"]
    inplace = not simple and draw(st.integers(0, 9)) == 0
    softmax = draw(st.sampled_from(SOFTMAXES)) if not simple else "torch.softmax(s, dim=-1)"
    if dtype == "float64" and ".float()" in softmax or "float32" in softmax and dtype == "float64":
        softmax = "torch.softmax(s, dim=-1)"
    grad = dtype != "bfloat16" and draw(st.integers(0, 3)) == 0
    dynamic = draw(st.integers(0, 6)) == 0
    square = bool(NEEDS_SQUARE & set(kinds)) or near in ("transposed_probs", "softmax_transposed") or layout == "packed"
    sk_is = None
    if near == "permute_not_transpose":
        variant = draw(st.sampled_from(["heads_are_keys", "batch_is_heads"]))
        w.tag("variant", variant)
        if variant == "heads_are_keys":
            sk_is = lambda hq, b: hq  # noqa: E731
            kinds = [k for k in kinds if k not in NEEDS_SQUARE]
            square = False
        else:
            heads = (2, 2)
    shapes = _draw_shapes(draw, heads, square=square, sq_one=near == "head_indexed_mask", dynamic=dynamic, sk_is=sk_is)
    if near == "permute_not_transpose" and sk_is is None:
        for s in shapes:
            s["b"] = 2
    hq, hkv = heads
    two_sites = not simple and qk == "matmul" and draw(st.integers(0, 7)) == 0
    if layout == "packed" or two_sites:
        for shape in shapes:
            shape["dv"] = shape["d"]
    fill = draw_fill(draw)
    if near in ("scale_after_finite_fill", "bias_after_finite_fill"):
        fill = draw(st.sampled_from(["-10000.0", "-5.0", "torch.finfo(s.dtype).min"]))
    if near == "downcast_scores":
        fill = "NEG_INF"  # the scores are float16/bfloat16 from there on
    d.__dict__.update(
        dynamic=dynamic, fill=fill, gqa=gqa, grad=grad, heads=heads, hkv=hkv, hq=hq, inplace=inplace, kinds=kinds,
        layout=layout, qk=qk, shapes=shapes, simple=simple, sk_is=sk_is, softmax=softmax, two_sites=two_sites
    )


def _write_inputs(draw, d: _Draft):
    """q, k, v (or one packed qkv) as inputs, in the drawn layout."""
    dtype, hkv, hq, layout, near, qk, w = d.get('dtype', 'hkv', 'hq', 'layout', 'near', 'qk', 'w')
    # inputs
    q_shape = "b, sq, hq, d" if layout == "bshd" else "b, hq, sq, d"
    kv_heads = "hq" if near == "k_only_gqa" else "hkv"
    k_heads = "hq" if near == "v_only_gqa" else "hkv"
    k_shape = (f"b, sk, {k_heads}, d" if layout == "bshd" else
               f"b, {k_heads}, d, sk" if qk == "matmul_pretransposed" else f"b, {k_heads}, sk, d")
    v_heads = kv_heads
    if near == "mismatched_gqa":
        v_heads = "1" if hkv > 1 else "hq // 2" if hq % 2 == 0 and hq // 2 != hkv else "hq"
    v_shape = f"b, sk, {v_heads}, dv" if layout == "bshd" else f"b, {v_heads}, sk, dv"
    if layout == "packed":
        w.add_input("qkv", "randn(gen, b, sq, 3, hq, d)")
        w(draw(st.sampled_from(["q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)",
                                "q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))"])))
    else:
        w.add_input("q", f"randn(gen, {q_shape})")
        w.add_input("k", f"randn(gen, {k_shape})")
        w.add_input("v", f"randn(gen, {v_shape})")
    w.tag("qk", qk)
    w.tag("layout", layout)
    w.tag("heads", f"{hq}/{hkv}")
    w.tag("dtype", dtype)

    if layout == "bshd" and qk not in ("einsum_bshd", "matmul_bshd"):
        w(draw(st.sampled_from(["q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)",
                                "q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))"])))


def _write_gqa(draw, d: _Draft):
    """K/V heads repeated for the query heads (repeat_kv, repeat_interleave, broadcast)."""
    copied, gqa, heads, near, qk, w = d.get('copied', 'gqa', 'heads', 'near', 'qk', 'w')
    # GQA
    head_dim = "2" if qk in ("einsum_bshd", "matmul_bshd") else "1"
    if gqa != "none" or near in ("k_only_gqa", "v_only_gqa", "mismatched_gqa"):
        w.tag("gqa", gqa if gqa != "none" else near)
        if copied == "repeat":  # repeat_interleave copies; the source is written afterwards
            which = draw(st.sampled_from(["k", "v"]))
            w.tag("written", which)
            w(f"{which}_src = {which}.clone()")
            w(f"k = {'k_src' if which == 'k' else 'k'}.repeat_interleave(q.shape[1] // k.shape[1], dim=1)")
            w(f"v = {'v_src' if which == 'v' else 'v'}.repeat_interleave(q.shape[1] // v.shape[1], dim=1)")
            w(f"{which}_src[:, :, :1] = 0.0  # written after the repeated copy was taken")
        elif near == "mismatched_gqa":
            w.helpers.add("repeat_kv")
            w("k = repeat_kv(k, q.shape[1] // k.shape[1])")
            w("v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)")
        else:
            which = "k" if near == "k_only_gqa" else "v" if near == "v_only_gqa" else None
            forms = ["repeat_kv", "repeat_interleave"] + (["broadcast"] if heads[1] == 1 else [])
            form = gqa if gqa != "none" else draw(st.sampled_from(forms))
            w(f"n = q.shape[{head_dim}] // {which or 'k'}.shape[{head_dim}]")
            for t in ([which] if which else ["k", "v"]):
                if form == "repeat_kv":
                    w.helpers.add("repeat_kv")
                    w(f"{t} = repeat_kv({t}, n)")
                elif form == "repeat_interleave":
                    w(draw(st.sampled_from([f"{t} = {t}.repeat_interleave(n, dim={head_dim})",
                                            f"{t} = torch.repeat_interleave({t}, n, dim={head_dim})"])))
                # broadcast: nothing to write, matmul broadcasts the single key/value head


def _write_scale(draw, d: _Draft):
    """Where the scale is applied (scores, q, k, both, baddbmm's alpha) and copies written after."""
    copied, near, qk, shapes, simple, w = d.get('copied', 'near', 'qk', 'shapes', 'simple', 'w')
    # scale
    placement = "scores" if simple else draw(st.sampled_from(["scores", "none", "q", "k", "q_and_k"]))
    if qk == "baddbmm":
        placement = "alpha"
    if near == "scale_after_finite_fill":
        placement = "after_masks"
    how = draw(st.sampled_from(["mul", "div"]))
    c = _scale_value(draw, how)
    c = c.replace("D", str(shapes[0]["d"]))  # the head dim as a literal (it is the same in every shape)
    w.tag("scale", f"{placement}:{how}")
    if placement == "q":
        w(f"q = {_scaled(draw, 'q', how, c)}")
    elif placement == "k":
        w(f"k = {_scaled(draw, 'k', how, c)}")
    elif placement == "q_and_k":
        w("q = q * q.shape[-1] ** -0.25")
        w("k = k * q.shape[-1] ** -0.25")
    if copied == "scale":  # the scaled copy is taken, then its source is written
        which = draw(st.sampled_from(["q", "k"]))
        w.tag("written", which)
        w(f"{which}_src = {which}.clone()")
        w(f"{which} = {which}_src * 0.5")
        w(f"{which}_src[:, :, :1] = 0.0  # written after the scaled copy was taken")
    if near == "mutated_scaled_q":
        which = draw(st.sampled_from(["q", "k"]))
        w(f"{which} = {which} * 0.5")
        w(f"{which}[:, :, :1] = 0.0  # overwrite the first position of the scaled {which}")
    d.__dict__.update(c=c, how=how, placement=placement)


def _write_scores(draw, d: _Draft):
    """Q·Kᵀ in the drawn spelling, the scale on the scores, and the near-misses there."""
    c, how, inplace, kinds, near, placement, qk, simple, sk_is, w = d.get(
        'c', 'how', 'inplace', 'kinds', 'near', 'placement', 'qk', 'simple', 'sk_is', 'w')
    # Q·Kᵀ
    bias3d = view_4d = False  # set by the bmm forms only
    letters = draw(st.sampled_from(EINSUM_LETTERS))
    lb, lh, lq, lk, ld = letters
    scores_3d = False
    needs_4d = bool(NEEDS_4D & set(kinds)) or near in ("per_head_scale", "head_indexed_mask")
    if qk == "matmul":
        kt = draw(st.sampled_from(KT_FORMS))
        if near == "permute_not_transpose":
            kt = "k.permute(0, 2, 1, 3).transpose(-2, -1)" if sk_is is not None else "k.permute(1, 0, 3, 2)"
        call = draw(st.sampled_from(["q @ {}", "torch.matmul(q, {})", "q.matmul({})"]))
        w(f"s = {call.format(kt)}")
    elif qk == "matmul_pretransposed":
        w("s = q @ k  # k is given as [b, h, d, sk]")
    elif qk == "matmul_bshd":  # straight from [b, s, h, d]: one permute makes Kᵀ
        w(f"s = q.transpose(1, 2) @ {draw(st.sampled_from(['k.permute(0, 2, 3, 1)', 'k.transpose(1, 2).transpose(2, 3)']))}")
    elif qk == "einsum":
        w(f's = torch.einsum("{lb}{lh}{lq}{ld},{lb}{lh}{lk}{ld}->{lb}{lh}{lq}{lk}", q, k)')
    elif qk == "einsum_ellipsis":
        w(f's = torch.einsum("...{lq}{ld},...{lk}{ld}->...{lq}{lk}", q, k)')
    elif qk == "einsum_bshd":
        w(f's = torch.einsum("{lb}{lq}{lh}{ld},{lb}{lk}{lh}{ld}->{lb}{lh}{lq}{lk}", q, k)')
    else:  # bmm / baddbmm over [b*h, s, d]
        w("bsz, nh, lq, hd = q.shape")
        w("lk = k.shape[-2]")
        w("q3 = q.reshape(bsz * nh, lq, hd)")
        w(draw(st.sampled_from(["k3 = k.reshape(bsz * nh, lk, hd)", "k3 = k.flatten(0, 1)"])))
        kt3 = draw(st.sampled_from(['k3.transpose(1, 2)', 'k3.mT']))
        if qk == "baddbmm":  # BLOOM / Falcon: beta * input + alpha * q3 @ k3ᵀ
            alpha = c if how == "mul" else f"1.0 / {c}"
            form = draw(st.sampled_from(["alibi", "zeros", "empty"]))
            w.tag("baddbmm", form)
            if form == "alibi":
                w.add_input("alibi", f"randn(gen, b * hq, {draw(st.sampled_from(['1', 'sq']))}, sk)")
                w(f"s = torch.baddbmm(alibi, q3, {kt3}, beta={draw(st.sampled_from(['1.0', '1']))}, alpha={alpha})")
            else:
                beta = "0.0" if form == "empty" else draw(st.sampled_from(["0.0", "1.0"]))
                w(f"s = torch.baddbmm(torch.{form}(bsz * nh, lq, lk, dtype=q.dtype), q3, {kt3}, beta={beta}, alpha={alpha})")
        else:
            w(f"s = torch.bmm(q3, {kt3})")
        scores_3d = True
        bias3d = not simple and draw(st.integers(0, 3)) == 0  # added to the 3-D scores, after the scale
        view_4d = needs_4d or draw(st.booleans())
        scores_3d = not view_4d
    if qk in ("bmm", "baddbmm"):
        w.tag("scores", "3d" if scores_3d else "4d")

    state = {"inplace": inplace, "n": 0, "scores_4d": not scores_3d, "index_forms": draw(st.sampled_from(INDEX_FORMS))}
    if placement == "scores":
        if inplace and draw(st.booleans()):
            w(f"s {'*=' if how == 'mul' else '/='} {c}")
        else:
            w(f"s = {_scaled(draw, 's', how, c)}")
    if near == "per_head_scale":
        w.add_input("hscale", "torch.rand(hq, generator=gen, dtype=torch.float64).to(DTYPE) + 0.5")
        w(draw(st.sampled_from(["s = s * hscale[:, None, None]", "s = s / hscale.view(-1, 1, 1)"])))
    if near == "tensor_scale":
        w("s = s * torch.tensor(0.3, dtype=s.dtype)")
    if near == "downcast_scores":
        w(draw(st.sampled_from(["s = s.to(torch.bfloat16)", "s = s.half()"])))
    if near == "negative_softcap":  # tanh is odd: this is a softcap of 5
        w("s = torch.tanh(s / -5.0) * -5.0")
    d.__dict__.update(bias3d=bias3d, letters=letters, scores_3d=scores_3d, state=state, view_4d=view_4d)


def _write_softcap(draw, d: _Draft):
    """A tanh softcap, then the 3-D bias and 4-D view of the bmm forms."""
    bias3d, qk, simple, view_4d, w = d.get('bias3d', 'qk', 'simple', 'view_4d', 'w')
    # softcap (before any bias: baddbmm's input is one)
    if not simple and not w.inputs_named("alibi") and draw(st.integers(0, 7)) == 0:
        cap = draw(st.sampled_from(["5.0", "20.0", "50.0"]))
        w.tag("softcap", cap)
        w(draw(st.sampled_from([f"s = torch.tanh(s / {cap}) * {cap}", f"s = {cap} * torch.tanh(s / {cap})",
                                f"s = s.div({cap}).tanh().mul({cap})"])))

    if qk in ("bmm", "baddbmm"):
        if bias3d:  # a bias at the 3-D layout, masks later at the 4-D one: the pass relays it out
            w.add_input("bias3d", f"randn(gen, b * hq, {draw(st.sampled_from(['1', 'sq']))}, sk)")
            w.tag("bias3d", True)
            w("s = s + bias3d")
        if view_4d:
            w("s = s.view(bsz, nh, lq, lk)")


def _write_masks(draw, d: _Draft):
    """The masks (and the near-misses among them)."""
    c, copied, dtype, fill, how, kinds, near, shapes, state, w = d.get(
        'c', 'copied', 'dtype', 'fill', 'how', 'kinds', 'near', 'shapes', 'state', 'w')
    # masks
    if copied == "mask":  # a padding mask combined into a band, then written
        kinds = []
        w.add_input("pad", "torch.arange(sk)[None, :] < torch.randint(0, sk + 1, (b, 1), generator=gen)")
        w("sq, sk = s.shape[-2], s.shape[-1]")
        w("pad_src = pad.clone()")
        w("keep = (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None]) & pad_src[:, None, None, :]")
        w("pad_src[:, :1] = True  # written after the mask was built")
        w("s = s.masked_fill(~keep, NEG_INF)")
    if near == "fill_tensor":
        kinds = []
        w.add_input("hidden", "torch.rand(1, 1, sq, sk, generator=gen) < 0.5")
        w.add_input("fill", "torch.full((), -10000.0, dtype=DTYPE)")
        w("s = torch.where(hidden, fill, s)")
    render_masks(draw, w, kinds, fill, state, shapes)
    if near == "scale_after_finite_fill":
        w(f"s = {_scaled(draw, 's', how, c)}")
    if near == "bias_after_finite_fill":
        w.add_input("alibi", "randn(gen, 1, hq, sq, sk)")
        w("s = s + alibi")
    if near == "row_broadcast_mask":
        w("sq, sk = s.shape[-2], s.shape[-1]")
        limit = draw(st.integers(0, 3))
        w(f"limit = torch.arange({limit}, {limit + 1})[:, None]  # one row: every query sees keys <= {limit}")
        w("keep = (torch.arange(sk)[None, :] <= limit).expand(sq, sk)")
        w(f"s = s.masked_fill(~keep, {fill if masked_fill_ok(fill, dtype) else 'NEG_INF'})")
    if near == "head_indexed_mask":
        w("nh, sk = s.shape[1], s.shape[-1]")
        w("vis = torch.arange(sk)[None, :] <= torch.arange(nh)[:, None]  # [heads, keys]: head h sees keys <= h")
        w(f"s = s.masked_fill(~vis.unsqueeze(-2), {fill if masked_fill_ok(fill, dtype) else 'NEG_INF'})")
    if near == "scores_reused":
        w("s = s - s.amax(dim=-1, keepdim=True)")
    w.tag("masks", "+".join(kinds) or "none")
    w.tag("fill", fill.replace(" ", ""))


def _write_softmax(draw, d: _Draft):
    """The softmax spelling, what follows it, dropout."""
    near, scores_3d, simple, softmax, w = d.get('near', 'scores_3d', 'simple', 'softmax', 'w')
    # softmax
    last = "2" if scores_3d else "3"
    w.tag("softmax", softmax.split("(")[0] if softmax != "manual" else "manual")
    if near == "softmax_dim":
        w(f"p = torch.softmax(s, dim={draw(st.sampled_from(['-2', '1' if scores_3d else '2']))})")
    elif near == "softmax_transposed":
        w("p = torch.softmax(s.mT, dim=-1)")
    elif softmax == "manual":
        w("m = s.amax(dim=-1, keepdim=True)")
        w("e = torch.exp(s - m)")
        w("p = e / e.sum(dim=-1, keepdim=True)")
    else:
        w(f"p = {softmax.replace('LAST', last)}")
    if near == "downcast_scores":
        w("p = p.to(v.dtype)")
    if near == "downcast_probs":
        w(draw(st.sampled_from(["p = p.to(torch.bfloat16).to(v.dtype)", "p = p.half().to(v.dtype)"])))
    if near == "after_softmax":
        w("p = " + draw(st.sampled_from(["p * 2.0", "p + 1e-3", "p.pow(2)", "p.tril()", "p.flip(-1)",
                                         "torch.relu(p - 0.05)", "p / 2"])))
    dropout = "" if simple else draw(st.sampled_from(DROPOUTS))
    if dropout:
        w.tag("dropout", dropout.split("(")[0])
        w(f"p = {dropout}")
    if near == "transposed_probs":
        w("p = p.mT")


def _write_pv(draw, d: _Draft) -> Program:
    """P·V, a second site, the heads merged, what is returned; the program."""
    dynamic, gqa, grad, layout, letters, near, qk, scores_3d, shapes, simple, two_sites, w = d.get(
        'dynamic', 'gqa', 'grad', 'layout', 'letters', 'near', 'qk', 'scores_3d', 'shapes', 'simple', 'two_sites', 'w')
    # P·V
    pv = _render_pv(draw, w, qk, layout, scores_3d, gqa, letters, simple)
    w.tag("pv", pv)
    if two_sites:  # a second attention over the same keys, the first's output as its queries
        w.tag("two_sites", True)
        w("out = torch.softmax(out @ k.mT * 0.5, dim=-1) @ v")
    if not simple and draw(st.integers(0, 3)) == 0:
        w.tag("epilogue", "merge_heads")
        if pv == "einsum_bshd":
            w("out = out.reshape(out.shape[0], out.shape[1], -1)")
        else:
            w("out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)")

    if near == "probs_returned":
        w.returns = "out, p"
    elif near == "probs_reused":
        w("out = out + p.sum(dim=-1, keepdim=True)")
    elif near == "scores_returned":
        w.returns = "out, s"

    is_attention = near is None
    expect_fused = is_attention  # _safe_softmax too: the op's zero_empty_rows gives its 0 for rows with no visible key
    options = draw(st.sampled_from(OPTIONS))  # small tiles exercise the kernel's tiling through the compiler
    if options:
        w.tag("options", "/".join(f"{k}={v}" for k, v in options.items()))
    src = w.source(is_attention, expect_fused, grad, dynamic, shapes, options)
    return Program(src, is_attention, expect_fused, tuple(w.tags))


def _render_pv(draw, w: Writer, qk: str, layout: str, scores_3d: bool, gqa: str, letters: str, simple: bool) -> str:
    lb, lh, lq, lk, ld = letters
    if scores_3d:  # bmm without a 4-D view
        form = draw(st.sampled_from(["bmm", "view_matmul"]))
        if form == "bmm":
            w(draw(st.sampled_from(["v3 = v.reshape(bsz * nh, lk, v.shape[-1])", "v3 = v.flatten(0, 1)"])))
            w("out = torch.bmm(p, v3).view(bsz, nh, lq, -1)")
        else:
            w("out = p.view(bsz, nh, lq, lk) @ v")
        return form
    if qk == "matmul_bshd":
        w("out = p @ v.transpose(1, 2)")
        return "transpose_matmul"
    if qk == "einsum_bshd":
        form = draw(st.sampled_from(["einsum_bshd", "transpose_matmul"]))
        if form == "einsum_bshd":
            w(f'out = torch.einsum("{lb}{lh}{lq}{lk},{lb}{lk}{lh}{ld}->{lb}{lq}{lh}{ld}", p, v)')
        else:
            w("out = p @ v.transpose(1, 2)")
        return form
    forms = ["@", "torch.matmul", ".matmul"]
    if not simple and gqa != "broadcast":
        forms += ["einsum", "bmm"]
    form = draw(st.sampled_from(forms))
    if form == "@":
        w("out = p @ v")
    elif form == "torch.matmul":
        w("out = torch.matmul(p, v)")
    elif form == ".matmul":
        w("out = p.matmul(v)")
    elif form == "einsum":
        w(f'out = torch.einsum("{lb}{lh}{lq}{lk},{lb}{lh}{lk}{ld}->{lb}{lh}{lq}{ld}", p, v)')
    else:
        w("pb, ph, pq, pk = p.shape")
        w("out = torch.bmm(p.reshape(pb * ph, pq, pk), v.reshape(pb * ph, pk, v.shape[-1])).view(pb, ph, pq, -1)")
    return form
