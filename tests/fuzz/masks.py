"""Mask strategies for ``tests.fuzz.programs``: each writes source lines that mask the scores ``s``.

A masker draws one way of writing one kind of mask (causal, window, dense bool / additive
inputs, key or query padding, packed segments, prefix-LM, a band ANDed with padding, ALiBi)
and applies it with one fill (``-inf``, ``finfo.min``, another constant): ``masked_fill``,
``torch.where`` either way round, or addition. ``render_masks`` writes up to three of them; with
a finite fill the additive ones come first (a bias added after a finite fill is not something
the op expresses, so a program doing it would not be attention the pass must fuse).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import strategies as st

if TYPE_CHECKING:
    from tests.fuzz.programs import Writer

BUFFER = 64  # in-graph mask buffers (built once, sliced) are this long; sequences are shorter

FILLS = (
    "NEG_INF", "torch.finfo(s.dtype).min", "float('-inf')", "-math.inf", "-1e9", "-10000.0",
    "-5.0", "0.0", "torch.finfo(torch.float32).min",
)
_INF_FILLS = {"NEG_INF", "float('-inf')", "-math.inf"}


def draw_fill(draw) -> str:
    return draw(st.sampled_from(FILLS))


def masked_fill_ok(fill: str, dtype: str) -> bool:
    """masked_fill raises when the value overflows the dtype (finfo(float32).min in bfloat16 or
    float16)."""
    return not (fill == "torch.finfo(torch.float32).min" and dtype in ("bfloat16", "float16"))


def offset(draw) -> tuple[str, int, bool]:
    """A band offset as source (in sq, sk) and whether it is the bottom-right ``sk - sq``."""
    base = draw(st.sampled_from(["0", "sk - sq"]))
    delta = draw(st.integers(-3, 3))
    if base == "0":
        return str(delta), delta, False
    return "sk - sq" + (f" + {delta}" if delta > 0 else f" - {-delta}" if delta < 0 else ""), delta, delta == 0


def plus(expr: str, k: int) -> str:
    """``expr + k`` as tidy source."""
    if k == 0:
        return expr if expr.replace("-", "").isdigit() or " " not in expr else f"({expr})"
    if expr.lstrip("-").isdigit():
        return str(int(expr) + k)
    return f"{expr} + {k}" if k > 0 else f"{expr} - {-k}"


# --- masks -------------------------------------------------------------------------------------


MASK_KINDS = ("causal", "window", "dense_bool", "dense_add", "key_padding", "segments", "query_padding", "prefix_lm",
              "band_and_padding", "causal", "key_padding", "alibi")
NEEDS_SQUARE = {"segments", "query_padding"}
NEEDS_4D = {"dense_bool", "dense_add", "key_padding", "segments", "query_padding", "band_and_padding", "alibi"}


def _indices(w: Writer, state: dict) -> None:
    """Define the query / key index tensors ``i``, ``j`` once, ahead of every mask."""
    if not state.get("ij"):
        i, j = state["index_forms"]
        w.body += [f"i = {i}", f"j = {j}"]
        state["ij"] = True


INDEX_FORMS = (("torch.arange(sq)[:, None]", "torch.arange(sk)[None, :]"),
               ("torch.arange(sq).unsqueeze(-1)", "torch.arange(sk).unsqueeze(0)"),
               ("torch.arange(sq).view(-1, 1)", "torch.arange(sk).view(1, -1)"),
               ("torch.arange(sq, device=s.device)[:, None]", "torch.arange(sk, device=s.device)"))


def _apply_visible(draw, w: Writer, vis: str, fill: str, state: dict) -> None:
    """Hide the scores where the boolean source expression ``vis`` is False."""
    forms = [f"torch.where({vis}, s, {fill})"]
    if masked_fill_ok(fill, w.scores_dtype):
        forms += [f"s.masked_fill(~({vis}), {fill})", f"s.masked_fill(({vis}).logical_not(), {fill})",
                  f"torch.where({vis}, s, torch.full([], {fill}, dtype=s.dtype))",  # GPT-2's mask_value
                  f"torch.where({vis}, s, torch.tensor({fill}, dtype=s.dtype))"]
    form = draw(st.sampled_from(forms))
    if state["inplace"] and form.startswith("s.masked_fill(") and draw(st.booleans()):
        w(form.replace("s.masked_fill(", "s.masked_fill_(", 1))
    else:
        w(f"s = {form}")


def _apply_hidden(draw, w: Writer, hid: str, fill: str, state: dict) -> None:
    """Hide the scores where the boolean source expression ``hid`` is True."""
    forms = [f"torch.where({hid}, {fill}, s)"]
    if masked_fill_ok(fill, w.scores_dtype):
        forms.insert(0, f"s.masked_fill({hid}, {fill})")
    form = draw(st.sampled_from(forms))
    if state["inplace"] and form.startswith("s.masked_fill(") and draw(st.booleans()):
        w(form.replace("s.masked_fill(", "s.masked_fill_(", 1))
    else:
        w(f"s = {form}")


def _apply_additive(draw, w: Writer, m: str, state: dict) -> None:
    state["additive"] = True
    form = draw(st.sampled_from([f"s + {m}", f"{m} + s", f"s.add({m})", f"torch.add(s, {m})"]))
    if state["inplace"] and draw(st.booleans()):
        w(f"s += {m}")
    else:
        w(f"s = {form}")


def _full(fill: str, dtype: str) -> str:
    """A float (sq, sk) constant of ``fill`` in the scores' dtype (built in float32 and cast
    where the value would overflow the dtype, as code written for float32 does)."""
    if not masked_fill_ok(fill, dtype):
        return f"torch.full((sq, sk), {fill})", ".to(s.dtype)"
    return f"torch.full((sq, sk), {fill}, dtype=s.dtype)", ""


def _band_visible(draw, w: Writer, lo: str | None, hi: str, state: dict) -> str:
    """A boolean source expression True where ``lo < j - i <= hi`` (lo None: unbounded)."""
    _indices(w, state)
    hi_forms = [f"j <= i + {hi}" if hi != "0" else "j <= i", f"j - i <= {hi}", f"i - j >= -({hi})",
                f"j < i + {plus(hi, 1)}"]
    vis = draw(st.sampled_from(hi_forms))
    if lo is not None:
        lo_form = draw(st.sampled_from([f"j > i + {lo}", f"j - i > {lo}", f"i - j < -({lo})"]))
        vis = draw(st.sampled_from([f"({vis}) & ({lo_form})", f"torch.logical_and({vis}, {lo_form})"]))
    return vis


def _mask_causal(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    off, delta, bottom_right = offset(draw)
    w.tag("causal", off.replace(" ", ""))
    forms = ["triu_full_add", "ones_triu_fill", "tril_eq0_fill", "tril_bool_where", "arange", "arange_start",
             "where_add", "zeros_fill_add", "new_ones_tril", "tril_cast_bool"]
    if state["scores_4d"]:
        forms.append("expand_4d")
    if bottom_right and all(s["sk"] >= s["sq"] for s in shapes):
        forms += ["buffer_slice", "float_buffer_slice"]
    form = draw(st.sampled_from(forms))
    w.tag("causal_form", form)
    if form == "triu_full_add":
        full, cast = _full(fill, w.scores_dtype)
        m = draw(st.sampled_from([f"torch.triu({full}, diagonal={plus(off, 1)}){cast}", f"{full}.triu({plus(off, 1)}){cast}"]))
        _apply_additive(draw, w, m, state)
    elif form == "ones_triu_fill":
        _apply_hidden(draw, w, f"torch.ones(sq, sk, dtype=torch.bool).triu({plus(off, 1)})", fill, state)
    elif form == "tril_eq0_fill":
        w(f"keep = torch.tril(torch.ones(sq, sk), diagonal={off})")
        _apply_hidden(draw, w, draw(st.sampled_from(["keep == 0", "keep.eq(0)"])), fill, state)
    elif form == "tril_bool_where":
        w(f"keep = torch.ones(sq, sk, dtype=torch.bool).tril({off})")
        _apply_visible(draw, w, "keep", fill, state)
    elif form == "arange":
        vis = _band_visible(draw, w, None, off, state)
        if draw(st.booleans()):
            _apply_visible(draw, w, vis, fill, state)
        else:
            _indices(w, state)
            _apply_hidden(draw, w, draw(st.sampled_from([f"j > i + {off}", f"j - i > {off}"])), fill, state)
    elif form == "arange_start":
        w(f"pos = torch.arange({off}, {plus(off, 0)} + sq)[:, None]")
        _apply_visible(draw, w, "torch.arange(sk)[None, :] <= pos", fill, state)
    elif form == "where_add":
        vis = _band_visible(draw, w, None, off, state)
        zero = "torch.zeros((), dtype=s.dtype)" if "s.dtype" in fill else "0.0"  # finfo(s.dtype) overflows float32
        _apply_additive(draw, w, f"torch.where({vis}, {zero}, {fill}).to(s.dtype)", state)
    elif form == "zeros_fill_add":
        _indices(w, state)
        if masked_fill_ok(fill, w.scores_dtype):
            m = f"torch.zeros(sq, sk, dtype=s.dtype).masked_fill(j > i + {off}, {fill})"
        else:
            m = f"torch.zeros(sq, sk).masked_fill(j > i + {off}, {fill}).to(s.dtype)"
        _apply_additive(draw, w, m, state)
    elif form == "new_ones_tril":
        w(f"keep = q.new_ones(sq, sk, dtype=torch.bool).tril({off})")
        _apply_visible(draw, w, "keep", fill, state)
    elif form == "tril_cast_bool":
        keep = draw(st.sampled_from(["torch.tril(torch.ones(sq, sk), diagonal=OFF).bool()",
                                     "torch.ones(sq, sk).tril(OFF).to(torch.bool)"]))
        w(f"keep = {keep.replace('OFF', off)}")
        _apply_visible(draw, w, "keep", fill, state)
    elif form == "expand_4d":  # HF's _expand_mask: [sq, sk] -> [b, 1, sq, sk]
        vis = _band_visible(draw, w, None, off, state)
        w(f"keep = ({vis})[None, None, :, :].expand(s.shape[0], 1, sq, sk)")
        _apply_visible(draw, w, "keep", fill, state)
    elif form == "buffer_slice":  # a causal buffer built once at the maximum length, sliced (HF GPT-2 style)
        w(f"buffer = torch.ones({BUFFER}, {BUFFER}, dtype=torch.bool).tril()")
        _apply_visible(draw, w, "buffer[sk - sq : sk, :sk]", fill, state)
    else:  # float_buffer_slice: an additive causal buffer, sliced
        full, cast = _full(fill, w.scores_dtype)
        full = full.replace("(sq, sk)", f"({BUFFER}, {BUFFER})")
        _apply_additive(draw, w, f"{full}.triu(1){cast}[sk - sq : sk, :sk]", state)


def _mask_window(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    off, _, _ = offset(draw)
    width = draw(st.integers(1, 6))
    lo = plus(off, -width)
    w.tag("window", f"{off.replace(' ', '')},{width}")
    form = draw(st.sampled_from(["arange", "two_triangles_add", "bool_or"]))
    w.tag("window_form", form)
    if form == "arange":
        _apply_visible(draw, w, _band_visible(draw, w, lo, off, state), fill, state)
    elif form == "two_triangles_add":
        full, cast = _full(fill, w.scores_dtype)
        _apply_additive(draw, w, f"({full}.triu({plus(off, 1)}){cast} + {full}.tril({lo}){cast})", state)
    else:
        ones = "torch.ones(sq, sk, dtype=torch.bool)"
        _apply_hidden(draw, w, f"({ones}.triu({plus(off, 1)}) | {ones}.tril({lo}))", fill, state)


def _mask_dense_bool(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    n = state["n"]
    mb, mh = draw(st.sampled_from(["1", "b"])), draw(st.sampled_from(["1", "hq"]))
    p = draw(st.sampled_from([0.5, 0.1, 0.9]))
    kind = draw(st.sampled_from(["hidden", "keep", "keep_float"]))
    w.tag("dense_bool", f"{kind}[{mb},{mh}]p{p}")
    shape = f"{mb}, {mh}, sq, sk"
    if kind == "hidden":
        name = w.add_input(f"hidden{n}", f"torch.rand({shape}, generator=gen) < {p}")
        _apply_hidden(draw, w, name, fill, state)
    elif kind == "keep":
        name = w.add_input(f"keep{n}", f"torch.rand({shape}, generator=gen) >= {p}")
        _apply_visible(draw, w, name, fill, state)
    else:
        name = w.add_input(f"keep{n}", f"(torch.rand({shape}, generator=gen) >= {p}).to(DTYPE)")
        _apply_hidden(draw, w, f"{name} == 0", fill, state)


def _mask_dense_add(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    n = state["n"]
    mb, mh = draw(st.sampled_from(["1", "b"])), draw(st.sampled_from(["1", "hq"]))
    content = draw(st.sampled_from(["neg_inf", "finfo_min", "alibi"]))
    p = draw(st.sampled_from([0.5, 0.1, 0.9]))
    w.tag("dense_add", f"{content}[{mb},{mh}]p{p}")
    shape = f"{mb}, {mh}, sq, sk"
    value = {"neg_inf": "float('-inf')", "finfo_min": "torch.finfo(DTYPE).min"}.get(content)
    if value is None:
        expr = f"randn(gen, {shape})"
    else:
        expr = f"torch.zeros({shape}, dtype=DTYPE).masked_fill(torch.rand({shape}, generator=gen) < {p}, {value})"
    _apply_additive(draw, w, w.add_input(f"bias{n}", expr), state)


def _pad_input(draw, w: Writer, n: int) -> str:
    side = draw(st.sampled_from(["right", "left"]))
    lens = "torch.randint(0, sk + 1, (b, 1), generator=gen)"
    expr = f"torch.arange(sk)[None, :] < {lens}" if side == "right" else f"torch.arange(sk)[None, :] >= sk - {lens}"
    w.tag("pad", side)
    return w.add_input(f"pad{n}", expr)


def _mask_key_padding(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    pad = _pad_input(draw, w, state["n"])
    form = draw(st.sampled_from(["bool", "additive_bert", "view", "int_eq0", "hf_expand"]))
    w.tag("key_padding", form)
    if form == "int_eq0":  # an int64 0/1 attention_mask
        _apply_hidden(draw, w, f"{pad}.long()[:, None, None, :] == 0", fill, state)
    elif form == "hf_expand":
        w(f"expanded = {pad}[:, None, None, :].expand(s.shape[0], 1, sq, sk).to(s.dtype)")
        _apply_hidden(draw, w, "expanded == 0", fill, state)
    elif form == "bool":
        _apply_visible(draw, w, f"{pad}[:, None, None, :]", fill, state)
    elif form == "view":
        _apply_visible(draw, w, f"{pad}.view({pad}.shape[0], 1, 1, -1)", fill, state)
    else:
        _apply_additive(draw, w, f"(1.0 - {pad}[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min", state)


def _mask_query_padding(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    pad = _pad_input(draw, w, state["n"])
    w.tag("query_padding", "bool")
    _apply_visible(draw, w, f"{pad}[:, None, :, None]", fill, state)


def _mask_segments(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    n = state["n"]
    seg = w.add_input(f"seg{n}", "torch.randint(0, 3, (b, sk), generator=gen).sort(dim=-1).values")
    causal = draw(st.booleans())
    w.tag("segments", "causal" if causal else "bidirectional")
    same = f"{seg}[:, None, :, None] == {seg}[:, None, None, :]"
    if causal:
        _indices(w, state)
        same = f"({same}) & (j <= i)"
    _apply_visible(draw, w, same, fill, state)


# ALiBi spellings: the relative S×S form, its negation, a per-key slope · j (BLOOM/MPT: a per-row
# offset from the relative form), MPT's arange built over a longer buffer and sliced from the end,
# one slope for every head, and the symmetric encoder form (which is not a linear slope).
ALIBI_FORMS = {
    "relative": "(slopes[:, None, None] * (j - i)).to(s.dtype)",
    "negated": "(-slopes.view(-1, 1, 1) * (i - j)).to(s.dtype)",
    "per_key": "(slopes[:, None, None] * j).to(s.dtype)",
    "sliced_buffer": f"(torch.arange(1 - {BUFFER}, 1).view(1, 1, {BUFFER}) * slopes.view(-1, 1, 1))[:, :, -sk:].to(s.dtype)",
    "scalar": "(0.25 * (j - i)).to(s.dtype)",
    "symmetric": "(-slopes[:, None, None] * (j - i).abs()).to(s.dtype)",
}


def _mask_alibi(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    """ALiBi computed in the graph: a per-head slope times a distance (``ALIBI_FORMS``)."""
    _indices(w, state)
    form = draw(st.sampled_from(sorted(ALIBI_FORMS)))
    w.tag("alibi", form)
    w("nh = s.shape[1]")
    w("slopes = torch.exp2(-8.0 * torch.arange(1, nh + 1) / nh)")
    _apply_additive(draw, w, ALIBI_FORMS[form], state)


def _mask_band_and_padding(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    """A band and key padding ANDed into one boolean mask (data-dependent term kept dense)."""
    off, _, _ = offset(draw)
    lo = plus(off, -draw(st.integers(1, 6))) if draw(st.booleans()) else None
    pad = _pad_input(draw, w, state["n"])
    w.tag("band_and_padding", f"{off.replace(' ', '')},{lo}")
    vis = _band_visible(draw, w, lo, off, state)
    pad4 = f"{pad}[:, None, None, :]"
    _apply_visible(draw, w, draw(st.sampled_from([f"({vis}) & {pad4}", f"{pad4} & ({vis})"])), fill, state)


def _mask_prefix_lm(draw, w: Writer, fill: str, state: dict, shapes: list) -> None:
    off, _, _ = offset(draw)
    prefix = draw(st.integers(1, 4))
    additive = draw(st.booleans()) or not masked_fill_ok(fill, w.scores_dtype)
    w.tag("prefix_lm", f"{off.replace(' ', '')},{prefix},{'add' if additive else 'bool'}")
    if additive:
        full, cast = _full(fill, w.scores_dtype)
        w(f"m = {full}.triu({plus(off, 1)}){cast}")
        w(f"m[:, :{prefix}] = 0.0  # the prefix is visible to every query")
        _apply_additive(draw, w, "m", state)
    else:
        w(f"hid = torch.ones(sq, sk, dtype=torch.bool).triu({plus(off, 1)})")
        w(f"hid[:, :{prefix}] = False  # the prefix is visible to every query")
        _apply_hidden(draw, w, "hid", fill, state)


_MASKERS = {
    "causal": _mask_causal, "window": _mask_window, "dense_bool": _mask_dense_bool, "dense_add": _mask_dense_add,
    "key_padding": _mask_key_padding, "query_padding": _mask_query_padding, "segments": _mask_segments,
    "prefix_lm": _mask_prefix_lm, "alibi": _mask_alibi, "band_and_padding": _mask_band_and_padding,
}


def draw_mask_kinds(draw) -> list:
    count = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    kinds = draw(st.lists(st.sampled_from(MASK_KINDS), min_size=count, max_size=count, unique=True))
    return kinds


def render_masks(draw, w: Writer, kinds: list, fill: str, state: dict, shapes: list) -> None:
    if not kinds:
        return
    w("sq, sk = s.shape[-2], s.shape[-1]")
    rendered = []
    for n, kind in enumerate(kinds):
        state["n"], state["additive"], w.buffer = n, False, []
        _MASKERS[kind](draw, w, fill, state, shapes)
        rendered.append((state["additive"], w.buffer))
    w.buffer = None
    if fill not in _INF_FILLS:  # a bias added after a finite fill is not something the op expresses
        rendered.sort(key=lambda r: not r[0])
    for _, lines in rendered:
        w.body += lines
