"""The Ascend mapping (fa_dynamo/kernels/vendor/npu.py) against a fake ``torch_npu``.

No NPU here: a fake module stands in for torch_npu. Its two functions take exactly the documented
signatures (parsed from the prototypes below, so a misspelled, missing or extra argument fails to
bind), check every argument's type and the documented constraints (layout, dtypes, head counts,
mask shapes per ``sparse_mode``, the compressed 2048×2048 mask, pre/next token limits), and compute
the documented semantics in float64 (including torch_npu's ``scale·(pse + q·kᵀ)`` and its sparse
modes counted from the top-left (0, 2) or bottom-right (3, 4) corner). Rows with no visible key
come back as finite garbage, as a real kernel's would: the mapping must recompute them.
"""

from __future__ import annotations

import inspect
import re
import sys
import types

import pytest
import torch

from fa_dynamo.kernels.vendor import npu
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.segments import Segments
from tests.kernels.test_ops import _case, _check_accuracy
from tests.kernels.test_segments import hidden_of, segment_ids

# Prototypes as documented (torch_npu API reference, Ascend/op-plugin docs).
FUSION_PROTOTYPE = (
    "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
    "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., "
    "int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, "
    "int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, "
    "bool sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)"
)
INFER_PROTOTYPE = (
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
    "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, Tensor? quant_scale2=None, "
    "Tensor? quant_offset2=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
    "Tensor? block_table=None, Tensor? query_padding_size=None, Tensor? kv_padding_size=None, "
    "Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, Tensor? value_antiquant_scale=None, "
    "Tensor? value_antiquant_offset=None, Tensor? key_shared_prefix=None, Tensor? value_shared_prefix=None, "
    "SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, Tensor? key_rope=None, "
    "Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, int pre_tokens=2147483647, "
    'int next_tokens=2147483647, str input_layout="BSH", int num_key_value_heads=0, int sparse_mode=0, '
    "int inner_precise=0, int block_size=0, int antiquant_mode=0, bool softmax_lse_flag=False, "
    "int key_antiquant_mode=0, int value_antiquant_mode=0) -> (Tensor, Tensor)"
)


def _parse(prototype: str) -> tuple[inspect.Signature, dict[str, str]]:
    """An ``inspect.Signature`` and the declared type of each argument."""
    body = re.match(r"\w+\((.*)\) ->", prototype).group(1)
    params, types_, kind = [], {}, inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in (a.strip() for a in body.split(",")):
        if item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        decl, _, default = item.partition("=")
        type_, name = decl.split()
        value = inspect.Parameter.empty
        if default:
            value = {"None": None, "True": True, "False": False}.get(default, None)
            if default not in ("None", "True", "False"):
                number = float(default) if "." in default else int(default) if default[0] != '"' else None
                value = default.strip('"') if number is None else number
        params.append(inspect.Parameter(name, kind, default=value))
        types_[name] = type_
    return inspect.Signature(params), types_


def _check_types(bound: inspect.BoundArguments, declared: dict[str, str]) -> None:
    for name, value in bound.arguments.items():
        t = declared[name]
        if t.endswith("?") and value is None:
            continue
        base = t.rstrip("?")
        ok = {
            "Tensor": isinstance(value, torch.Tensor),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }.get(base, isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value))
        assert ok, f"{name}: declared {t}, got {type(value).__name__}"


def _visible(mode: int, pre: int, nxt: int, num_q: int, num_k: int) -> torch.Tensor:
    """torch_npu's band per sparse mode: bool [Sq, Sk], True where the score is computed."""
    d = torch.arange(num_k)[None, :] - torch.arange(num_q)[:, None]  # j - i
    if mode == 2:
        return d <= 0
    if mode == 3:
        return d <= num_k - num_q
    if mode == 4:
        d = d - (num_k - num_q)  # counted from the bottom-right corner
    return (d >= -pre) & (d <= nxt)


def _attend(q, k, v, scores_add, hidden, scale):
    """Documented math in float64; rows with nothing visible come back as finite garbage."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = scale * (scores_add + q.double() @ k.transpose(-1, -2))
    s = s.masked_fill(hidden, float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    row_max = s.amax(-1, keepdim=True)
    p = torch.exp(s - row_max)
    out = (p / p.sum(-1, keepdim=True)) @ v
    out = out.masked_fill(dead, 0.0)
    row_max = row_max.masked_fill(dead, -1e4)
    row_sum = p.sum(-1, keepdim=True).masked_fill(dead, 1.0)
    return out.to(q.dtype), row_max.float(), row_sum.float()


def _assert_compressed(mask):
    assert mask.dtype in (torch.bool, torch.uint8)
    assert mask.reshape(-1, 2048, 2048).shape[0] == 1, f"compressed mask must be 2048x2048, got {tuple(mask.shape)}"
    assert torch.equal(mask.reshape(2048, 2048).bool(), torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))


def _check_band_limits(pre: int, nxt: int, num_q: int, num_k: int) -> None:
    assert pre + nxt >= 0, "pre_tokens and next_tokens must overlap"
    if nxt < 0:
        assert pre >= -nxt and -nxt < num_k, "negative next_tokens out of documented range"
    if pre < 0:
        assert nxt >= -pre and -pre < num_q, "negative pre_tokens out of documented range"


class FakeTorchNpu(types.ModuleType):
    """``torch_npu`` with its two fused attention entry points, recorded in ``calls``."""

    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []
        self._fusion = _parse(FUSION_PROTOTYPE)
        self._infer = _parse(INFER_PROTOTYPE)

    def npu_fusion_attention(self, *args, **kwargs):
        sig, declared = self._fusion
        bound = sig.bind(*args, **kwargs)
        _check_types(bound, declared)
        bound.apply_defaults()
        a = bound.arguments
        self.calls.append(("npu_fusion_attention", dict(a)))
        q, k, v = a["query"], a["key"], a["value"]
        assert a["input_layout"] == "BNSD" and q.dim() == k.dim() == v.dim() == 4
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        b, n, sq, d = q.shape
        nkv, sk = k.shape[1], k.shape[2]
        assert k.shape[:3] == v.shape[:3] and k.shape[0] == b and k.shape[3] == d
        assert v.shape[3] <= d <= 768, "D: Dq = Dk >= Dv, 1..768"
        assert a["head_num"] == n and n % nkv == 0 and n <= 256
        assert a["padding_mask"] is None and a["prefix"] is None
        assert a["actual_seq_qlen"] is None and a["actual_seq_kvlen"] is None
        assert 0 < a["keep_prob"] <= 1 and a["inner_precise"] in (0, 1, 2)
        pse = a["pse"]
        if pse is not None:
            assert pse.dtype == q.dtype, "query, key, value and pse must share a dtype"
            assert tuple(pse.shape) in {(b, n, sq, sk), (b, n, 1, sk), (1, n, sq, sk)}, f"pse {tuple(pse.shape)}"
        mode, pre, nxt, mask = a["sparse_mode"], a["pre_tockens"], a["next_tockens"], a["atten_mask"]
        hidden = self._hidden(mask, mode, pre, nxt, q, k, {(b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)})
        out, row_max, row_sum = _attend(q, k, v, 0.0 if pse is None else pse.double(), hidden, a["scale"])
        return out, row_max.expand(b, n, sq, 8), row_sum.expand(b, n, sq, 8), torch.empty(0), 0, 0, 0

    def npu_fused_infer_attention_score(self, *args, **kwargs):
        sig, declared = self._infer
        bound = sig.bind(*args, **kwargs)
        _check_types(bound, declared)
        bound.apply_defaults()
        a = bound.arguments
        self.calls.append(("npu_fused_infer_attention_score", dict(a)))
        q, k, v = a["query"], a["key"], a["value"]
        used = ("query", "key", "value", "atten_mask")
        unused = [n for n, t in declared.items() if n not in used and t.endswith("?")]
        assert all(a[n] is None for n in unused), "quantization / paging / prefix / pse_shift are not used"
        assert all(t.is_contiguous() for t in (q, k, v)), "non-contiguous inputs are not supported"
        assert a["input_layout"] == "BNSD" and q.dim() == 4 and k.shape == v.shape
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        b, n, sq, d = q.shape
        nkv, sk = k.shape[1], k.shape[2]
        assert a["num_heads"] == n and n <= 256 and d <= 512 and (sq == 1 or d % 16 == 0)
        assert a["num_key_value_heads"] in (0, nkv) and n % nkv == 0 and n // nkv <= 64
        assert a["softmax_lse_flag"] is True and a["inner_precise"] in (0, 1, 2, 3) and a["block_size"] == 0
        mode, pre, nxt, mask = a["sparse_mode"], a["pre_tokens"], a["next_tokens"], a["atten_mask"]
        if sq == 1:  # Q_S = 1: sparse_mode and pre/next tokens have no effect
            assert mask is None or tuple(mask.shape) in {(b, sk), (b, 1, sk), (b, 1, 1, sk)}, tuple(mask.shape)
            mode, pre, nxt = 0, npu.INT_MAX, npu.INT_MAX
            if mask is not None:
                mask = mask.reshape(b, 1, 1, sk)
        shapes = {(b, sq, sk), (1, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)}
        hidden = self._hidden(mask, mode, pre, nxt, q, k, shapes)
        out, row_max, row_sum = _attend(q, k, v, 0.0, hidden, a["scale"])
        return out, (row_max + row_sum.log()).reshape(b, n, sq, 1)

    @staticmethod
    def _hidden(mask, mode, pre, nxt, q, k, dense_shapes):
        """Bool broadcastable to [B, N, Sq, Sk]: True where masked."""
        sq, sk = q.shape[2], k.shape[2]
        assert mode in (0, 2, 3, 4), f"sparse_mode {mode} is not one fa_dynamo uses"
        if mask is None:
            assert mode == 0, "without atten_mask sparse_mode has no effect: the mapping must not rely on it"
            return torch.zeros(sq, sk, dtype=torch.bool)
        assert mask.dtype in (torch.bool, torch.uint8, torch.int8)
        if mode == 0:
            assert tuple(mask.shape) in dense_shapes, f"dense mask of shape {tuple(mask.shape)}"
            band_hidden = ~_visible(0, pre, nxt, sq, sk)
            assert not (band_hidden & ~mask.bool()).any(), "atten_mask and pre/next tokens disagree"
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
            return mask.bool()
        _assert_compressed(mask)
        if mode == 4:
            _check_band_limits(pre, nxt, sq, sk)
        return ~_visible(mode, pre, nxt, sq, sk)


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake


def test_prototypes_parse_to_the_documented_arguments():
    sig, declared = _parse(FUSION_PROTOTYPE)
    assert list(sig.parameters)[:5] == ["query", "key", "value", "head_num", "input_layout"]
    assert sig.parameters["pre_tockens"].default == 2147483647 and declared["prefix"] == "int[]?"
    sig, declared = _parse(INFER_PROTOTYPE)
    assert sig.parameters["num_heads"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["input_layout"].default == "BSH" and len(sig.parameters) == 40


def _run(q, k, v, kw, scale, *, fill=float("-inf"), training=None):
    return npu.attention_npu(
        q, k, v, kw.get("bias"), kw.get("mask"),
        AttentionParams(scale=scale, fill=fill, band=Band(kw.get("lo"), kw.get("hi")), block_q=16, block_k=16),
        training=training,
    )


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = {
    # name: (shape (B, Hq, Hkv, Sq, Sk, D, Dv), band (lo, hi), masks, dtype, training,
    #        expected (op, sparse_mode, pre, next))
    "full": ((1, 4, 4, 24, 24, 32, 32), (None, None), "", F16, False, ("infer", 0, None, None)),
    "causal top-left": ((2, 4, 2, 20, 30, 32, 32), (None, 0), "", F16, False, ("infer", 2, None, None)),
    "causal bottom-right": ((1, 4, 2, 20, 30, 64, 64), (None, 10), "", BF16, False, ("infer", 3, None, None)),
    "causal Sq > Sk": ((1, 2, 1, 30, 20, 32, 32), (None, -10), "", F16, True, ("train", 3, None, None)),
    "sliding window": ((1, 8, 2, 20, 30, 32, 32), (-8, 10), "", F16, False, ("infer", 4, 18, 0)),
    "band below diagonal": ((1, 2, 2, 30, 30, 16, 16), (-12, -3), "", F32, False, ("train", 4, 12, -3)),
    "band above diagonal": ((1, 2, 2, 30, 30, 16, 16), (5, 9), "", F16, False, ("infer", 4, -5, 9)),
    "band past the keys": ((1, 2, 2, 20, 20, 16, 16), (-30, -25), "", F16, False, ("infer", 0, None, None)),
    "dense mask + causal": ((2, 4, 2, 24, 24, 32, 32), (None, 0), "mask", F16, False, ("infer", 0, None, None)),
    "per-head mask": ((1, 4, 4, 24, 24, 32, 32), (None, None), "head_mask", F16, False, ("train", 0, None, None)),
    "bias (pse)": ((2, 4, 2, 24, 28, 32, 32), (None, 4), "bias", F32, False, ("train", 3, None, None)),
    "bias fp16": ((1, 4, 2, 24, 28, 32, 32), (-6, 4), "bias", F16, False, ("train", 4, 10, 0)),
    "training": ((1, 4, 2, 24, 24, 32, 32), (None, 0), "", BF16, True, ("train", 2, None, None)),
    "head dim not /16": ((1, 2, 2, 24, 24, 40, 40), (None, None), "", F16, False, ("train", 0, None, None)),
    "Dv < D": ((1, 2, 1, 24, 24, 64, 32), (None, 0), "", F16, False, ("train", 2, None, None)),
    "decode": ((2, 8, 2, 1, 40, 64, 64), (None, 39), "", F16, False, ("infer", 0, None, None)),
    "decode window": ((2, 8, 2, 1, 40, 64, 64), (-15, 39), "", BF16, False, ("infer", 0, None, None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mapping_and_results(fake_npu, name):
    shape, (lo, hi), masks, dtype, training, (op, mode, pre, nxt) = CASES[name]
    b, hq, hkv, sq, sk, d, dv = shape
    q, k, v, kw = _case(shape, dtype, "bias" if masks == "bias" else "none", seed=7)
    kw.update({"lo": lo, "hi": hi})
    if masks == "mask":
        kw["mask"] = torch.rand(b, 1, sq, sk) > 0.7
    if masks == "head_mask":
        kw["mask"] = torch.rand(b, hq, sq, sk) > 0.7
    scale = d ** -0.5
    out, lse = _run(q, k, v, kw, scale, training=training)
    _check_accuracy(out, q, k, v, {n: t for n, t in kw.items() if t is not None}, scale)

    (called, args), = fake_npu.calls
    assert called == {"infer": "npu_fused_infer_attention_score", "train": "npu_fusion_attention"}[op]
    assert args["sparse_mode"] == mode
    tokens = ("pre_tokens", "next_tokens") if op == "infer" else ("pre_tockens", "next_tockens")
    assert (args[tokens[0]], args[tokens[1]]) == (pre or npu.INT_MAX, npu.INT_MAX if nxt is None else nxt)
    assert args["key"].shape[1] == hkv, "GQA: key/value keep their heads"
    if op == "infer":
        assert (args["num_heads"], args["num_key_value_heads"]) == (hq, hkv)
    if masks == "bias":  # pse enters before the scale
        torch.testing.assert_close(args["pse"].double() * scale, kw["bias"].double().expand_as(args["pse"]),
                                   atol=2e-3, rtol=2e-3)

    ref = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) * scale
    if "bias" in kw:
        ref = ref + kw["bias"].double()
    hidden = Band(lo, hi).hidden(torch.arange(sq), torch.arange(sk))
    if kw.get("mask") is not None:
        hidden = hidden | kw["mask"]
    ref_lse = torch.logsumexp(ref.masked_fill(hidden, float("-inf")), -1)
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    tol = 1e-4 if dtype == F32 else 2e-2
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), atol=tol, rtol=tol)


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float16).min, -10.0])
def test_rows_without_visible_keys_follow_eager(fake_npu, fill):
    q, k, v, _ = _case((2, 4, 2, 30, 24, 32, 32), F16)
    mask = torch.rand(2, 1, 30, 24) > 0.5
    mask[0, :, 3] = True
    kw = {"mask": mask, "hi": -4}
    out, _ = _run(q, k, v, kw, 0.2, fill=fill, training=False)
    _check_accuracy(out, q, k, v, kw, 0.2, fill=fill)
    assert out[0, :, 3].isnan().all() == (fill == float("-inf"))


def test_requires_grad_picks_the_training_kernel(fake_npu):
    q, k, v, kw = _case((1, 2, 2, 16, 16, 32, 32), F16, "causal")
    _run(q.requires_grad_(), k, v, kw, 0.2)
    _run(q.detach(), k, v, kw, 0.2)
    assert [c for c, _ in fake_npu.calls] == ["npu_fusion_attention", "npu_fused_infer_attention_score"]


def test_compressed_mask_is_built_once_per_device(fake_npu):
    q, k, v, kw = _case((1, 2, 2, 16, 16, 32, 32), F16, "causal")
    _run(q, k, v, kw, 0.2, training=False)
    _run(q, k, v, kw, 0.2, training=True)
    first, second = (args["atten_mask"] for _, args in fake_npu.calls)
    assert first is second


@pytest.mark.parametrize(
    "what, shape, dtype, softcap",
    [("softcap", (1, 2, 2, 9, 9, 16, 16), F16, 2.0), ("float64", (1, 2, 2, 9, 9, 16, 16), torch.float64, 0.0),
     ("Dv > D", (1, 2, 2, 9, 9, 16, 32), F16, 0.0)],
)
def test_unserved_calls_fall_back_without_calling_torch_npu(fake_npu, what, shape, dtype, softcap):
    q, k, v, kw = _case(shape, dtype, "causal")
    out, _ = npu.attention_npu(q, k, v, None, None, AttentionParams(
        scale=0.3, softcap=softcap, band=Band(None, kw["hi"]), block_q=16, block_k=16))
    _check_accuracy(out, q, k, v, kw, 0.3, softcap=softcap)
    assert fake_npu.calls == []


def test_without_torch_npu_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ImportError
    q, k, v, kw = _case((1, 2, 2, 9, 9, 16, 16), F16, "causal")
    assert npu.unsupported_reason(q, k, v, 0.0) == "torch_npu is not importable"
    out, _ = _run(q, k, v, kw, 0.3)
    _check_accuracy(out, q, k, v, kw, 0.3)


@pytest.mark.parametrize(
    "band, num_q, num_k, plan",
    [((None, None), 8, 8, npu.SparsePlan(0)), ((None, 0), 8, 12, npu.SparsePlan(2)),
     ((None, 4), 8, 12, npu.SparsePlan(3)), ((-3, 4), 8, 12, npu.SparsePlan(4, 7, 0)),
     ((-3, None), 8, 12, npu.SparsePlan(4, 7, npu.INT_MAX)), ((None, 6), 8, 12, npu.SparsePlan(4, npu.INT_MAX, 2)),
     ((-20, -15), 8, 8, npu.SparsePlan(0, fold_band=True)), ((None, 3), 1, 12, npu.SparsePlan(0, fold_band=True))],
)
def test_sparse_plan(band, num_q, num_k, plan):
    assert npu.sparse_plan(Band(*band), num_q, num_k, has_dense_mask=False) == plan


def test_segments_reach_torch_npu_in_the_dense_mask(fake_npu):
    q, k, v, kw = _case((2, 4, 2, 24, 24, 32, 32), F16, "causal", seed=2)
    q_ids, k_ids = segment_ids("packed", 2, 24, 24, seed=3)
    out, _ = npu.attention_npu(q, k, v, None, None, AttentionParams(
        scale=0.2, band=Band(None, kw["hi"]), block_q=16, block_k=16, segments=Segments(q_ids, k_ids)), training=False)
    (_, args), = fake_npu.calls
    assert args["sparse_mode"] == 0
    _check_accuracy(out, q, k, v, {**kw, "mask": hidden_of(q_ids, k_ids)}, 0.2)
