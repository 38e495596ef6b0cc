"""The Triton FastAttention backward kernels (FlashAttention-2) and their custom op.

``delta = rowsum(dO ∘ O)``; then one program per key tile computes dK and dV, looping over the
query heads of its GQA group and over the query tiles the band lets see its keys (the forward's
tiling-mask with rows and columns swapped: empty tiles skipped, full tiles unmasked), and one
program per query tile computes dQ over the key tiles it sees; both rebuild P from the forward's
LSE. Rows the forward served through the reference (no visible key, non-negligible finite fill)
get a zero kernel contribution and the reference's gradient instead, so NaN lands where eager
autograd puts it.

The launches run inside the custom op ``fa_dynamo::attention_triton_backward`` (with a fake
implementation), so ``attention_triton_backward`` can sit in a backward formula that aot_autograd
traces.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from fa_dynamo.logs import warn_once
from fa_dynamo.kernels.backward import attention_backward, row_gradients
from fa_dynamo.kernels.backward_op import register_backward_op
from fa_dynamo.kernels.exactness import unserved_rows
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.triton.forward import (
    _RESOURCE_ERRORS,
    LOG2E,
    _alibi_args,
    _run_args,
    _segment_clip,
    _constexprs,
    _dense_args,
    _dot,
    _launch,
    _segment_args,
    _seq_class,
    _region_bounds,
    _score_tile,
    _tile_ranges,
    attention_triton,
    unsupported_reason,
)

log = logging.getLogger(__name__)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, bias_ptrs, mask_ptrs, qseg_ptrs, k_ids, stride_qm, stride_dom,
    stride_bias_m, stride_mask_m, stride_qseg_m, offs_n, offs_m, key_ok, d_ok, dv_ok, slope, start, end, num_q, lo,
    hi, scale, softcap, PARTIAL: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV of one key tile over query tiles ``[start, end)`` (scores transposed: keys × queries)."""
    for start_m in range(start, end, BLOCK_M):
        rows_q = start_m + offs_m
        q_ok = rows_q < num_q
        if PARTIAL:
            q_t = tl.load(q_ptrs + start_m * stride_qm, mask=d_ok[:, None] & q_ok[None, :], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=q_ok[:, None] & dv_ok[None, :], other=0.0)
            tile_ok = key_ok[:, None] & q_ok[None, :]
        else:
            q_t = tl.load(q_ptrs + start_m * stride_qm, mask=d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=dv_ok[None, :], other=0.0)
            tile_ok = key_ok[:, None]
        qk_t = _dot(k, q_t, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_F32, PRECISION)
        q_ids = rows_q
        if HAS_SEG:
            q_ids = tl.load(qseg_ptrs + start_m * stride_qseg_m, mask=q_ok, other=0)
        s_t, t_t = _score_tile(  # keys are the rows here
            qk_t, scale, softcap, bias_ptrs + rows_q[None, :].to(tl.int64) * stride_bias_m,
            mask_ptrs + rows_q[None, :].to(tl.int64) * stride_mask_m, tile_ok, rows_q[None, :], offs_n[:, None],
            q_ids[None, :], k_ids[:, None], q_ok[None, :], lo, hi, slope,
            PARTIAL, HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE,
        )
        lse = tl.load(lse_ptr + rows_q, mask=q_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows_q, mask=q_ok, other=0.0)
        p_t = tl.math.exp2((s_t - lse[None, :]) * LOG2E)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_F32, PRECISION)
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), DOT_F32, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, DOT_F32, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Bias, Mask, QSeg, KSeg, Slopes, SegRuns, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_qseg_b, stride_qseg_m, stride_kseg_b, stride_kseg_n, stride_slope_b, stride_slope_h,
    stride_runs_b, stride_runs_m,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, num_kv_heads, group, num_q, num_k, lo, hi, scale, softcap,
    Q_CLASS, K_CLASS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SEG_SKIP: tl.constexpr,
    SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // num_kv_heads).to(tl.int64)
    off_hkv = (off_bkv % num_kv_heads).to(tl.int64)

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < num_k
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qseg_ptrs = QSeg + off_b * stride_qseg_b + offs_m * stride_qseg_m
    k_ids = offs_n
    if HAS_SEG:
        k_ids = tl.load(KSeg + off_b * stride_kseg_b + offs_n * stride_kseg_n, mask=key_ok, other=0)

    row0 = start_n * BLOCK_N
    row_last = tl.minimum(row0 + BLOCK_N, num_k) - 1
    start, full_start, full_end, end = _tile_ranges(row0, row_last, num_q, -hi, -lo, HAS_HI, HAS_LO, BLOCK_M)
    if SEG_SKIP:  # the query runs of these keys' ids
        run_ptrs = SegRuns + off_b * stride_runs_b + offs_n * stride_runs_m
        start, full_start, full_end, end = _segment_clip(start, full_start, full_end, end, run_ptrs, key_ok, num_q,
                                                         BLOCK_M)
    for g in range(0, group):  # the query heads that read this key/value head
        off_h = off_hkv * group + g
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm
        do_ptrs = DO + off_b * stride_dob + off_h * stride_doh
        do_ptrs = do_ptrs + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
        lse_ptr = Lse + (off_b * num_heads + off_h) * num_q
        delta_ptr = Delta + (off_b * num_heads + off_h) * num_q
        bias_ptrs = Bias + off_b * stride_bias_b + off_h * stride_bias_h
        bias_ptrs = bias_ptrs + offs_n[:, None] * stride_bias_n  # + query rows, in the loop
        mask_ptrs = Mask + off_b * stride_mask_b + off_h * stride_mask_h
        mask_ptrs = mask_ptrs + offs_n[:, None] * stride_mask_n
        slope = scale * 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + off_b * stride_slope_b + off_h * stride_slope_h).to(tl.float32)
        for_tiles = (
            q_ptrs, do_ptrs, lse_ptr, delta_ptr, bias_ptrs, mask_ptrs, qseg_ptrs, k_ids,
            stride_qm, stride_dom, stride_bias_m, stride_mask_m, stride_qseg_m, offs_n, offs_m, key_ok, d_ok, dv_ok, slope,
        )
        for region in tl.static_range(3):
            region_start, region_end = _region_bounds(region, start, full_start, full_end, end)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, *for_tiles, region_start, region_end, num_q, lo, hi, scale, softcap, region != 1,
                HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE, DOT_F32, PRECISION,
                BLOCK_M,
            )
    dk_ptrs = DK + off_b * stride_dkb + off_hkv * stride_dkh
    tl.store(dk_ptrs + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk * scale,
             mask=key_ok[:, None] & d_ok[None, :])
    dv_ptrs = DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn
    dv_ptrs = dv_ptrs + offs_dv[None, :] * stride_dvd
    tl.store(dv_ptrs, dv, mask=key_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, mask_ptrs, kseg_ptrs, q_ids, stride_kn, stride_vn,
    stride_bias_n, stride_mask_n, stride_kseg_n, offs_m, offs_n, row_ok, d_ok, dv_ok, slope, start, end, num_k, lo,
    hi, scale, softcap, PARTIAL: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query tile over key tiles ``[start, end)``."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < num_k
        if PARTIAL:
            k_t = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v_t = tl.load(v_ptrs + start_n * stride_vn, mask=dv_ok[:, None] & col_ok[None, :], other=0.0)
            tile_ok = row_ok[:, None] & col_ok[None, :]
        else:
            k_t = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
            v_t = tl.load(v_ptrs + start_n * stride_vn, mask=dv_ok[:, None], other=0.0)
            tile_ok = row_ok[:, None]
        qk = _dot(q, k_t, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, PRECISION)
        k_ids = cols
        if HAS_SEG:
            k_ids = tl.load(kseg_ptrs + start_n * stride_kseg_n, mask=col_ok, other=0)
        s, t = _score_tile(
            qk, scale, softcap, bias_ptrs + start_n * stride_bias_n, mask_ptrs + start_n * stride_mask_n, tile_ok,
            offs_m[:, None], cols[None, :], q_ids[:, None], k_ids[None, :], col_ok[None, :], lo, hi, slope,
            PARTIAL, HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE,
        )
        p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        dp = _dot(do, v_t, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_F32, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), dq, DOT_F32, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, Bias, Mask, QSeg, KSeg, Slopes, SegRuns, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_qseg_b, stride_qseg_m, stride_kseg_b, stride_kseg_n, stride_slope_b, stride_slope_h,
    stride_runs_b, stride_runs_m,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, group, num_q, num_k, lo, hi, scale, softcap,
    Q_CLASS, K_CLASS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_ALIBI: tl.constexpr, SEG_SKIP: tl.constexpr,
    SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    off_hkv = off_h // group

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < num_q
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh
    do_ptrs = do_ptrs + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * num_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + off_bh.to(tl.int64) * num_q + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn
    bias_ptrs = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    bias_ptrs = bias_ptrs + offs_m[:, None].to(tl.int64) * stride_bias_m + offs_n[None, :] * stride_bias_n
    mask_ptrs = Mask + off_b * stride_mask_b + off_h * stride_mask_h
    mask_ptrs = mask_ptrs + offs_m[:, None].to(tl.int64) * stride_mask_m + offs_n[None, :] * stride_mask_n
    kseg_ptrs = KSeg + off_b * stride_kseg_b + offs_n * stride_kseg_n
    q_ids = offs_m
    if HAS_SEG:
        q_ids = tl.load(QSeg + off_b * stride_qseg_b + offs_m * stride_qseg_m, mask=row_ok, other=0)
    slope = scale * 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_slope_b + off_h * stride_slope_h).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    row0 = start_m * BLOCK_M
    row_last = tl.minimum(row0 + BLOCK_M, num_q) - 1
    start, full_start, full_end, end = _tile_ranges(row0, row_last, num_k, lo, hi, HAS_LO, HAS_HI, BLOCK_N)
    if SEG_SKIP:
        run_ptrs = SegRuns + off_b * stride_runs_b + offs_m * stride_runs_m
        start, full_start, full_end, end = _segment_clip(start, full_start, full_end, end, run_ptrs, row_ok, num_k,
                                                         BLOCK_N)
    for_tiles = (
        k_ptrs, v_ptrs, bias_ptrs, mask_ptrs, kseg_ptrs, q_ids,
        stride_kn, stride_vn, stride_bias_n, stride_mask_n, stride_kseg_n,
        offs_m, offs_n, row_ok, d_ok, dv_ok, slope,
    )
    for region in tl.static_range(3):
        region_start, region_end = _region_bounds(region, start, full_start, full_end, end)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, *for_tiles, region_start, region_end, num_k, lo, hi, scale, softcap, region != 1,
            HAS_LO, HAS_HI, HAS_BIAS, HAS_MASK, HAS_SEG, HAS_ALIBI, SOFTCAP, LIBDEVICE, DOT_F32, PRECISION, BLOCK_N,
        )
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq * scale, mask=row_ok[:, None] & d_ok[None, :])


def attention_triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
    params: AttentionParams,
    *,
    needs_bias_grad: bool, needs_slopes_grad: bool = False, out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> tuple:
    """Same contract as ``backward.attention_backward``: ``(dq, dk, dv, dbias, dslopes)``.

    ``out`` and ``lse`` are the forward's results (re-computed when not given). The kernels run
    inside the custom op ``fa_dynamo::attention_triton_backward``, so this function can be traced
    (aot_autograd traces the backward formula with fake tensors). A bias or ALiBi slope gradient
    goes to the reference backward, which is traceable as it is.
    """
    if needs_bias_grad or (needs_slopes_grad and params.alibi is not None):
        warn_once(log, "the triton backward does not compute bias or ALiBi slope gradients; "
                  "using the reference backward")
        return attention_backward(grad_out, q, k, v, bias, mask, params, needs_bias_grad=needs_bias_grad,
                                  needs_slopes_grad=needs_slopes_grad)
    reason = unsupported_reason(q, v)
    if reason is not None:  # here, not inside the custom op below, where autograd does not record
        warn_once(log, f"{reason}; using the reference backward instead")
        return attention_backward(grad_out, q, k, v, bias, mask, params, needs_bias_grad=False)
    if out is None or lse is None:
        out, lse = attention_triton(q, k, v, bias, mask, params)
    dq, dk, dv = torch.ops.fa_dynamo.attention_triton_backward(
        grad_out, q, k, v, bias, mask, out, lse, **params.op_arguments())
    return dq, dk, dv, None, None


def _backward(grad_out, q, k, v, bias, mask, out, lse, params: AttentionParams):
    """The FA2 backward kernels: ``(dq, dk, dv)`` in the inputs' dtypes. Rows the kernels cannot
    serve (``unserved_rows``: rows with no visible key among them) go to the reference."""
    reason = unsupported_reason(q, v)
    if reason is not None or min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        if reason is not None:
            warn_once(log, f"{reason}; using the reference backward instead")
        return attention_backward(grad_out, q, k, v, bias, mask, params, needs_bias_grad=False)[:3]

    batch, heads, num_q, _ = q.shape
    kv_heads, num_k = k.shape[1], k.shape[2]
    band, segments, alibi, softcap = params.band, params.segments, params.alibi, params.softcap
    block_q, block_k = params.block_q, params.block_k
    rows = unserved_rows(lse, mask, params, num_k).any(dim=0).any(dim=0).nonzero().flatten()
    delta = (grad_out.float() * out.float()).sum(-1)
    lse_k = lse.float().contiguous()
    if rows.numel():  # the reference serves these rows: their kernel contribution must be zero
        lse_k = lse_k.index_fill(2, rows, float("inf"))
        delta = delta.index_fill(2, rows, 0.0)
    delta = delta.contiguous()

    full = (batch, heads, num_q, num_k)
    bias_t, bias_s = _dense_args(bias, full, q)
    mask_t, mask_s = _dense_args(mask, full, q)
    q_ids, k_ids, seg_s = _segment_args(segments, q)
    slopes, slope_s = _alibi_args(alibi, q)
    key_runs, key_runs_s, skip_keys = _run_args(None if segments is None else segments.key_runs(), q)
    query_runs, query_runs_s, skip_queries = _run_args(None if segments is None else segments.query_runs(), q)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    common = (heads // kv_heads, num_q, num_k, band.min_offset or 0, band.max_offset or 0, params.scale, softcap,
              _seq_class(num_q), _seq_class(num_k))
    consts = _constexprs(q, v, bias, mask, params)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *bias_s, *mask_s, *seg_s, *slope_s)
    try:
        _launch(
            _attn_bwd_dkdv, lambda meta: (triton.cdiv(num_k, meta["BLOCK_N"]), batch * kv_heads),
            (q, k, v, grad_out, lse_k, delta, bias_t, mask_t, q_ids, k_ids, slopes, query_runs, dk, dv, *strides,
             *query_runs_s, *dk.stride(), *dv.stride(), heads, kv_heads, *common),
            dict(consts, SEG_SKIP=skip_queries), q, block_q, block_k, bias, mask, backward=True,
        )
        _launch(
            _attn_bwd_dq, lambda meta: (triton.cdiv(num_q, meta["BLOCK_M"]), batch * heads),
            (q, k, v, grad_out, lse_k, delta, bias_t, mask_t, q_ids, k_ids, slopes, key_runs, dq, *strides, *key_runs_s,
             *dq.stride(), heads, *common),
            dict(consts, SEG_SKIP=skip_keys), q, block_q, block_k, bias, mask, backward=True,
        )
    except _RESOURCE_ERRORS as e:
        warn_once(log, f"no triton backward tile config fits this GPU ({type(e).__name__}); using the reference")
        return attention_backward(grad_out, q, k, v, bias, mask, params, needs_bias_grad=False)[:3]
    if rows.numel():
        _add_reference_rows(dq, dk, dv, rows, grad_out, q, k, v, bias, mask, params)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_reference_rows(dq, dk, dv, rows, grad_out, q, k, v, bias, mask, params: AttentionParams):
    """Add the reference's gradients of query rows ``rows`` (``backward.row_gradients``) to the
    kernels' fp32 buffers, in place: their dq replaces the kernel's zero contribution."""
    row_dq, row_dk, row_dv = row_gradients(grad_out, q, k, v, bias, mask, params, rows)
    dq.index_copy_(2, rows, row_dq.index_select(2, rows).to(dq.dtype))
    dk += row_dk.to(dk.dtype)
    dv += row_dv.to(dv.dtype)


register_backward_op("attention_triton_backward", _backward)
