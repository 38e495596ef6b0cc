"""The Triton FastAttention forward kernel (two-level tiling, tiling-mask) and its host side.

Laid out like the Triton fused-attention tutorial. Forward: one program per (outer tile of
``BLOCK_M`` query rows, batch × query head); its inner loop walks ``BLOCK_N``-key tiles with an
online softmax (``_attn_fwd_inner`` returns ``(acc, l_i, m_i)``) and the epilogue stores the
output and the log-sum-exp. The tiling-mask comes from the band ``lo <= j - i <= hi``:
``_tile_ranges`` turns it into loop bounds, so empty tiles are never visited, full tiles run with
no mask evaluation at all, and only the partial tiles on the band's edges build a mask from
indices. A dense bias or boolean mask is read tile by tile (never copied or expanded); segment
ids (packed sequences, chunked attention) are loaded per tile and compared; an ALiBi bias is
computed from the head's slope and the tile's indices. GQA maps
query head ``h`` to key/value head ``h // G``; for short query chunks (decode) the G heads of a
group are packed into one program's rows and the keys split across programs (``_forward``).
Head dims are padded to the next power of two with
masked loads; q·kᵀ and p·v accumulate in float32.

Rows the kernel cannot serve exactly (no visible key: NaN in eager; a finite fill value that is
not negligible: a uniform average) are detected from the LSE and recomputed by the reference,
exactly as the CPU kernel does (``exactness.recompute_unserved_rows``). NaN: a packed (decode)
call screens only the keys it cut (its programs read every other key, and a NaN score or value
makes the row NaN or its lse -inf); other calls screen every input whole (tiles they skip are not
tracked). That NaN analysis is tested in the interpreter; no GPU has run it yet. The backward
kernels, which
share this module's device helpers and launcher, are in ``backward.py``.

With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU
tensors in Triton's interpreter (that is how CI tests them).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None

try:
    from triton.runtime.errors import PTXASError

    _RESOURCE_ERRORS: tuple = (OutOfResources, PTXASError)
except ImportError:  # pragma: no cover
    _RESOURCE_ERRORS = (OutOfResources,)

from fa_dynamo.logs import warn_once
from fa_dynamo.kernels.triton import configs as tc
from fa_dynamo.kernels.alibi import Alibi
from fa_dynamo.kernels.cpu import attention_cpu
from fa_dynamo.kernels.exactness import ALL_KEYS, recompute_unserved_rows
from fa_dynamo.kernels.gqa_packing import PACK_MAX_ROWS, packs, visible_keys
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import keys_of, reference_attention
from fa_dynamo.kernels.segments import Segments
from fa_dynamo.kernels.split_keys import key_splits, merge_chunks

log = logging.getLogger(__name__)

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 256
SPLIT_ALIGN = 128
"""Keys per split are a multiple of this: every config's BLOCK_N divides it, so splits start on
the tile grid."""

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.tanh(x)
    else:  # the interpreter has no libdevice; float64 keeps the formula exact to fp32 rounding
        x64 = x.to(tl.float64)
        e = tl.exp(-2.0 * tl.abs(x64))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(x64 < 0, -t, t).to(tl.float32)
    return y


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 anyway
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_ranges(row0, row_last, num_cols, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Column tiles of rows ``[row0, row_last]`` under the band ``lo <= col - row <= hi``.

    Returns ``(start, full_start, full_end, end)``: tiles starting in ``[start, full_start)`` and
    ``[full_end, end)`` are partial (their mask is built from indices), tiles in
    ``[full_start, full_end)`` are full (no mask), and nothing outside ``[start, end)`` is visited.
    """
    col_lo = row0 * 0
    col_hi = col_lo + num_cols
    if HAS_LO:
        col_lo = tl.maximum(row0 + lo, 0)
    if HAS_HI:
        col_hi = tl.minimum(row_last + hi + 1, num_cols)
    col_hi = tl.maximum(col_hi, col_lo)
    start = tl.where(col_hi > col_lo, (col_lo // BLOCK) * BLOCK, col_hi)  # no visible column: no tile
    full_lo = start
    full_hi = col_lo * 0 + num_cols
    if HAS_LO:
        full_lo = tl.maximum(full_lo, row_last + lo)
    if HAS_HI:
        full_hi = tl.minimum(full_hi, row0 + hi + 1)
    full_start = ((full_lo + BLOCK - 1) // BLOCK) * BLOCK
    full_end = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    none_full = full_end <= full_start
    full_start = tl.where(none_full, col_hi, full_start)
    full_end = tl.where(none_full, col_hi, full_end)
    return start, full_start, full_end, col_hi


@triton.jit
def _segment_clip(start, full_start, full_end, end, run_ptrs, rows_ok, num_cols, BLOCK: tl.constexpr):
    """The loop bounds of ``_tile_ranges`` clipped to the columns whose segment id one of the rows
    holds: ``run_ptrs`` point at each row's ``[first, last + 1)`` column run (sorted ids), so
    tiles of other packed sequences or chunks are never visited."""
    col_lo = tl.min(tl.load(run_ptrs, mask=rows_ok, other=num_cols), 0)
    col_hi = tl.max(tl.load(run_ptrs + 1, mask=rows_ok, other=0), 0)
    col_lo = (col_lo // BLOCK) * BLOCK  # tiles start on the grid
    return _clip_ranges(start, full_start, full_end, end, col_lo, tl.maximum(col_hi, col_lo))


@triton.jit
def _clip_ranges(start, full_start, full_end, end, col_lo, col_hi):
    """The loop bounds of ``_tile_ranges`` kept inside columns ``[col_lo, col_hi)`` (``col_lo``
    on the tile grid): a segment's run, or one split of the keys."""
    start = tl.minimum(tl.maximum(start, col_lo), col_hi)
    full_start = tl.minimum(tl.maximum(full_start, col_lo), col_hi)
    full_end = tl.minimum(tl.maximum(full_end, col_lo), col_hi)
    end = tl.minimum(tl.maximum(end, col_lo), col_hi)
    return start, full_start, full_end, end


@triton.jit
def _score_tile(
    qk, scale, softcap, bias_ptrs, mask_ptrs, tile_ok, q_pos, k_pos, q_ids, k_ids, band_ok, lo, hi, slope,
    PARTIAL: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """One tile's scores from ``q·kᵀ`` in the reference's order: scale, softcap, bias, ALiBi, the
    dense mask, segment ids, and (``PARTIAL`` tiles) the band ``lo <= j - i <= hi`` with ``band_ok``
    (columns or rows past the end). Positions and ids come as broadcastable 2-D blocks — queries
    down the rows in the forward and dQ, across the columns in dK/dV — so the forward and both
    backward kernels share this one definition. Returns ``(scores, tanh)``: the softcap's tanh is
    what its chain rule needs (the scores when there is no softcap)."""
    s = qk * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap, LIBDEVICE)
        s = softcap * t
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        s += slope * (k_pos - q_pos).to(tl.float32)
    if HAS_MASK:
        hidden = tl.load(mask_ptrs, mask=tile_ok, other=1) != 0
        s = tl.where(hidden, float("-inf"), s)
    if HAS_SEG:
        s = tl.where(q_ids == k_ids, s, float("-inf"))
    if PARTIAL:
        diff = k_pos - q_pos
        keep = band_ok
        if HAS_LO:
            keep = keep & (diff >= lo)
        if HAS_HI:
            keep = keep & (diff <= hi)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _region_bounds(region: tl.constexpr, start, full_start, full_end, end):
    """Tile loop bounds of region 0 (partial tiles left of the band's full region), 1 (full tiles:
    no band mask) and 2 (partial tiles right of it), from ``_tile_ranges``."""
    if region == 0:
        lo, hi = start, full_start
    elif region == 1:
        lo, hi = full_start, full_end
    else:
        lo, hi = full_end, end
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, mask_ptrs, kseg_ptrs, q_ids, stride_kn, stride_vn, stride_bias_n,
    stride_mask_n, stride_kseg_n, q_pos, offs_n, row_ok, d_ok, dv_ok, slope, start, end, num_k, lo, hi, scale,
    softcap, PARTIAL: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax over key tiles ``[start, end)``; ``PARTIAL`` tiles evaluate the band at the
    rows' positions ``q_pos``."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < num_k
        if PARTIAL:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            tile_ok = row_ok[:, None] & col_ok[None, :]
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
            tile_ok = row_ok[:, None]
        qk = _dot(q, k, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, PRECISION)
        k_ids = cols
        if HAS_SEG:
            k_ids = tl.load(kseg_ptrs + start_n * stride_kseg_n, mask=col_ok, other=0)
        s, _ = _score_tile(
            qk, scale, softcap, bias_ptrs + start_n * stride_bias_n, mask_ptrs + start_n * stride_mask_n, tile_ok,
            q_pos[:, None], cols[None, :], q_ids[:, None], k_ids[None, :], col_ok[None, :], lo, hi, slope,
            PARTIAL, HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE,
        )
        s = s * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PARTIAL:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=dv_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Bias, Mask, QSeg, KSeg, Slopes, SegRuns, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_qseg_b, stride_qseg_m, stride_kseg_b, stride_kseg_n, stride_slope_b, stride_slope_h,
    stride_runs_b, stride_runs_m,
    stride_ob, stride_oh, stride_om, stride_od, stride_o_split, stride_lse_split,
    num_heads, group, num_q, num_k, lo, hi, scale, softcap, split_keys,
    Q_CLASS, K_CLASS,  # autotuning keys (sequence-length buckets), unused by the kernel
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SEG_SKIP: tl.constexpr,
    SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PACKED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACKED:  # GQA packing: row g·Sq + i of K/V head off_hkv is query i of head off_hkv·G + g
        kv_heads = num_heads // group
        off_b = (off_bh // kv_heads).to(tl.int64)
        off_hkv = (off_bh % kv_heads).to(tl.int64)
        off_h = off_hkv * group
        row_head = off_h + offs_m // num_q
        row_pos = offs_m % num_q
        row_ok = offs_m < group * num_q
        pos_first = 0 * start_m  # a block holds several heads' rows: the band of every position
        pos_last = num_q - 1
    else:
        off_b = (off_bh // num_heads).to(tl.int64)
        off_h = (off_bh % num_heads).to(tl.int64)
        off_hkv = off_h // group  # GQA: no repeated K/V
        row_head = off_h + offs_m * 0
        row_pos = offs_m
        row_ok = offs_m < num_q
        pos_first = start_m * BLOCK_M
        pos_last = tl.minimum(pos_first + BLOCK_M, num_q) - 1

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM  # head dims padded to a power of two
    dv_ok = offs_dv < HEAD_DIM_V
    heads_rows = row_head[:, None]
    pos_rows = row_pos[:, None].to(tl.int64)

    q_ptrs = Q + off_b * stride_qb + heads_rows * stride_qh + pos_rows * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    bias_ptrs = Bias + off_b * stride_bias_b + heads_rows * stride_bias_h
    bias_ptrs = bias_ptrs + pos_rows * stride_bias_m + offs_n[None, :] * stride_bias_n
    mask_ptrs = Mask + off_b * stride_mask_b + heads_rows * stride_mask_h
    mask_ptrs = mask_ptrs + pos_rows * stride_mask_m + offs_n[None, :] * stride_mask_n
    kseg_ptrs = KSeg + off_b * stride_kseg_b + offs_n * stride_kseg_n
    q_ids = row_pos
    if HAS_SEG:
        q_ids = tl.load(QSeg + off_b * stride_qseg_b + row_pos * stride_qseg_m, mask=row_ok, other=0)
    slope = scale * 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_slope_b + off_h * stride_slope_h).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    start, full_start, full_end, end = _tile_ranges(pos_first, pos_last, num_k, lo, hi, HAS_LO, HAS_HI, BLOCK_N)
    if SEG_SKIP:
        run_ptrs = SegRuns + off_b * stride_runs_b + row_pos * stride_runs_m
        start, full_start, full_end, end = _segment_clip(start, full_start, full_end, end, run_ptrs, row_ok, num_k,
                                                         BLOCK_N)
    if SPLIT:  # split-K: this program's share of the keys (``split_keys`` is a multiple of BLOCK_N)
        split_lo = split * split_keys
        start, full_start, full_end, end = _clip_ranges(start, full_start, full_end, end, split_lo,
                                                        tl.minimum(split_lo + split_keys, num_k))
    for_tiles = (
        k_ptrs, v_ptrs, bias_ptrs, mask_ptrs, kseg_ptrs, q_ids,
        stride_kn, stride_vn, stride_bias_n, stride_mask_n, stride_kseg_n,
        row_pos, offs_n, row_ok, d_ok, dv_ok, slope,
    )
    for region in tl.static_range(3):
        region_start, region_end = _region_bounds(region, start, full_start, full_end, end)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, *for_tiles, region_start, region_end, num_k, lo, hi, scale, softcap, region != 1,
            HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE, DOT_F32, PRECISION, BLOCK_N,
        )

    # epilogue: rows that saw no key get lse = -inf (the caller recomputes them)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = Out + split * stride_o_split + off_b * stride_ob + heads_rows * stride_oh + pos_rows * stride_om
    tl.store(o_ptrs + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    lse_ptrs = Lse + split * stride_lse_split + (off_b * num_heads + row_head) * num_q + row_pos
    tl.store(lse_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Host side: support checks, configs, launches
# ----------------------------------------------------------------------------------------------




def _arch(device: torch.device) -> Optional[tc.Arch]:
    return tc.arch_for(torch.cuda.get_device_capability(device), is_rocm=torch.version.hip is not None)


def unsupported_reason(q: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot serve these inputs, or None when they can."""
    device = q.device.type
    if device == "cpu" and not INTERPRETED:
        return "the triton kernel runs on CPU tensors only under TRITON_INTERPRET=1 (set before fa_dynamo imports it)"
    if device not in ("cpu", "cuda"):
        return f"the triton kernel serves CUDA/ROCm tensors, not {device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton kernel computes float16/bfloat16/float32, not {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"the triton kernel supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}/{v.shape[-1]}"
    if device == "cuda" and not INTERPRETED:
        return tc.unsupported_reason(_arch(q.device), str(q.dtype).removeprefix("torch."))
    return None


def _fallback(q, k, v, bias, mask, params: AttentionParams, reason: str):
    on_cpu = q.device.type == "cpu"
    warn_once(log, f"{reason}; using the {'cpu' if on_cpu else 'reference'} kernel instead")
    return (attention_cpu if on_cpu else reference_attention)(q, k, v, bias, mask, params)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _seq_class(n: int) -> int:
    """Autotuning key: sequence lengths bucketed to powers of two (no retuning per length)."""
    return min(_pow2(n, 1), 1 << 16)


def _dense_args(t: Optional[torch.Tensor], shape, like: torch.Tensor):
    """A bias/mask broadcast (stride 0, no copy) to ``shape``, and its strides; a dummy when absent."""
    if t is None:
        return like, (0, 0, 0, 0)
    t = t.expand(shape)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t, t.stride()


def _segment_args(segments: Optional[Segments], like: torch.Tensor):
    """``(q_ids, k_ids, their four strides)``; dummies when absent."""
    if segments is None:
        return like, like, (0, 0, 0, 0)
    return segments.q, segments.k, (*segments.q.stride(), *segments.k.stride())


def _run_args(runs: Optional[torch.Tensor], like: torch.Tensor):
    """``(runs, its two leading strides, SEG_SKIP)`` for ``Segments.key_runs``/``query_runs``;
    a dummy and no skipping when absent (no segments, or ids that are not sorted)."""
    if runs is None:
        return like, (0, 0), False
    return runs, runs.stride()[:2], True


def _alibi_args(alibi: Optional[Alibi], q: torch.Tensor):
    """``(slopes broadcast to [B, Hq], its two strides)``; a dummy when absent."""
    if alibi is None:
        return q, (0, 0)
    slopes = alibi.slopes.expand(q.shape[0], q.shape[1])
    return slopes, slopes.stride()


def _constexprs(q, v, bias, mask, params: AttentionParams) -> dict:
    precision = None  # half types: the backend's default
    if q.dtype == torch.float32 or INTERPRETED:  # fp32: as exact as torch's matmul unless TF32 is allowed
        tf32 = q.device.type == "cuda" and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 and torch.version.hip is None else "ieee"
    return dict(
        HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_D=_pow2(q.shape[-1]), BLOCK_DV=_pow2(v.shape[-1]),
        HAS_LO=params.band.min_offset is not None, HAS_HI=params.band.max_offset is not None,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_SEG=params.segments is not None,
        HAS_ALIBI=params.alibi is not None, SOFTCAP=params.softcap > 0,
        LIBDEVICE=not INTERPRETED, DOT_F32=INTERPRETED and q.dtype == torch.bfloat16,
        PRECISION=precision,
    )


_AUTOTUNE_KEY = ["Q_CLASS", "K_CLASS", "HEAD_DIM", "HEAD_DIM_V", "HAS_LO", "HAS_HI", "HAS_BIAS", "HAS_MASK", "HAS_SEG",
                 "HAS_ALIBI", "SOFTCAP", "PACKED", "SPLIT"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel, backward: bool, arch: tc.Arch, problem: tc.Problem, max_block_m: int, max_block_n: int):
    """The kernel wrapped in an autotuner over the architecture's configs that fit shared memory."""
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_stages=c.stages, num_warps=c.warps)
        for c in tc.configs_for(arch, problem, backward=backward, max_block_m=max_block_m, max_block_n=max_block_n)
    ]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(kernel)


def _launch(kernel, grid_of, args: tuple, consts: dict, q, block_q: int, block_k: int, bias, mask,
            backward: bool = False) -> None:
    """Run one kernel: a fixed config in the interpreter, the autotuned configs on a GPU."""
    if INTERPRETED:
        cfg = tc.interpreter_config(block_q, block_k)
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        kernel[grid_of(meta)](*args, **consts, **meta)
        return
    problem = tc.Problem(
        head_dim=consts["BLOCK_D"], head_dim_v=consts["BLOCK_DV"], elem_bytes=q.element_size(),
        bias_bytes=0 if bias is None else bias.element_size(), has_mask=mask is not None,
    )
    tuned = _tuned(kernel, backward, _arch(q.device), problem, _pow2(block_q), _pow2(block_k))
    with torch.cuda.device(q.device):
        tuned[grid_of](*args, **consts)


def _key_splits(problems: int, rows: int, num_k: int, device: torch.device) -> tuple[int, int]:
    """``(splits, keys per split)`` for split-K: only for short query chunks (``rows`` per program
    at most ``PACK_MAX_ROWS``: longer ones fill the GPU with row blocks), by ``key_splits``'s rule
    with the GPU's multiprocessors (the interpreter's threads on CPU) as the units to keep busy;
    each split a multiple of ``SPLIT_ALIGN`` keys."""
    if rows > PACK_MAX_ROWS:
        return 1, 0
    on_gpu = device.type == "cuda"
    units = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else torch.get_num_threads()
    splits = key_splits(problems, num_k, units)
    if splits == 1:
        return 1, 0
    per_split = triton.cdiv(triton.cdiv(num_k, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(num_k, per_split), per_split


def _visible_slice(q, k, v, bias, mask, params: AttentionParams):
    """``(inputs, unread, biased)``: a packed call's inputs cut to the keys some row can see
    (``gqa_packing.visible_keys``: a static cache's unfilled slots, hidden by the mask, are never
    read), as views, the band renumbered from the first kept key, and the key ranges left out
    (``unread``; ``biased``: those a ``-inf`` bias cut) for the exactness screen. Every row of a
    packed program reads every kept key (NaN carries through as in eager's ``softmax · V``), so
    only the cut keys are screened. Other calls: unchanged inputs, ``unread = ALL_KEYS``."""
    inputs = (q, k, v, bias, mask, params)
    if not packs(q, k, params):
        return inputs, ALL_KEYS, ()
    num_k = k.shape[2]
    (k0, k1), (m0, m1) = visible_keys(bias, mask, params, q.shape[2], num_k)
    if k1 <= k0:
        return inputs, ALL_KEYS, ()
    if (k0, k1) != (0, num_k):
        inputs = (q, k[:, :, k0:k1], v[:, :, k0:k1], keys_of(bias, k0, k1), keys_of(mask, k0, k1),
                  params.replace(band=params.band.shifted(k0)))
    return inputs, [(0, k0), (k1, num_k)], [(m0, k0), (k1, m1)]


def _forward(q, k, v, bias, mask, params: AttentionParams):
    """The kernel's own result: ``(out, lse)``; rows with no visible key have ``lse = -inf``.

    Short query chunks of grouped heads are packed (``gqa_packing.packs``: the G query heads of a
    group are rows of one program, so K/V are read once per group) and, where the programs leave
    the GPU idle, split along the keys (flash-decoding) and merged by log-sum-exp."""
    band, segments = params.band, params.segments
    batch, heads, num_q, _ = q.shape
    kv_heads, num_k = k.shape[1], k.shape[2]
    full = (batch, heads, num_q, num_k)
    packed = packs(q, k, params)
    rows, grid_heads = ((heads // kv_heads) * num_q, kv_heads) if packed else (num_q, heads)
    splits, split_keys = _key_splits(batch * grid_heads, rows, num_k, q.device)
    if splits == 1:
        out = torch.empty(batch, heads, num_q, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, heads, num_q, dtype=torch.float32, device=q.device)
        out_strides = (*out.stride(), 0, 0)
    else:  # each split's normalized partial result, merged below
        out = torch.empty(splits, batch, heads, num_q, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, batch, heads, num_q, dtype=torch.float32, device=q.device)
        out_strides = (*out.stride()[1:], out.stride(0), lse.stride(0))
    bias_t, bias_s = _dense_args(bias, full, q)
    mask_t, mask_s = _dense_args(mask, full, q)
    q_ids, k_ids, seg_s = _segment_args(segments, q)
    slopes, slope_s = _alibi_args(params.alibi, q)
    runs, runs_s, seg_skip = _run_args(None if segments is None else segments.key_runs(), q)
    args = (
        q, k, v, bias_t, mask_t, q_ids, k_ids, slopes, runs, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bias_s, *mask_s, *seg_s, *slope_s, *runs_s, *out_strides,
        heads, heads // kv_heads, num_q, num_k, band.min_offset or 0, band.max_offset or 0, params.scale,
        params.softcap, split_keys, _seq_class(num_q), _seq_class(num_k),
    )
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batch * grid_heads, splits)  # noqa: E731
    consts = dict(_constexprs(q, v, bias, mask, params), SEG_SKIP=seg_skip, PACKED=packed, SPLIT=splits > 1)
    _launch(_attn_fwd, grid, args, consts, q, params.block_q, params.block_k, bias, mask)
    if splits > 1:
        out, lse = merge_chunks(out, lse, dim=0)
        out = out.to(q.dtype)
    return out, lse


def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], params: AttentionParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``attention_cpu``: ``(out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] fp32)``.

    ``block_q`` / ``block_k`` cap the outer and inner tile sizes (on a GPU the per-architecture
    configs in ``configs`` are autotuned below those caps; in the interpreter they are the
    tile sizes, rounded down to powers of two in [16, 128]). Inputs the kernel cannot serve
    (float64, head dims over 256, CPU tensors without ``TRITON_INTERPRET=1``, pre-Volta GPUs,
    bfloat16 before sm80) go to the CPU / reference kernel, said once in the log.
    """
    reason = unsupported_reason(q, v)
    if reason is not None:
        return _fallback(q, k, v, bias, mask, params, reason)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return reference_attention(q, k, v, bias, mask, params)
    try:
        inputs, unread, biased = _visible_slice(q, k, v, bias, mask, params)
        out, lse = _forward(*inputs)
    except _RESOURCE_ERRORS as e:  # every tile config was too big for this GPU (e.g. fp32, D=256, sm75)
        return _fallback(q, k, v, bias, mask, params, f"no triton tile config fits this GPU ({type(e).__name__})")
    recompute_unserved_rows(out, lse, q, k, v, bias, mask, params, unread_keys=unread, biased_keys=biased)
    return out, lse
