"""xFormers dispatch: ``fa_dynamo::attention`` on ``xformers.ops.memory_efficient_attention``.

Layout: our ``[B, H, S, D]`` becomes xformers' BMHK (``[B, S, H, D]``, a transpose view). With
GQA (``Hkv < Hq``) the call uses the 5-D BMGHK layout ``[B, S, G, H, D]`` that xformers documents
for grouped heads, where *its* ``G`` is our ``Hkv`` and *its* ``H`` our group size ``Hq / Hkv``:
``q`` is ``[B, Sq, Hkv, Hq/Hkv, D]`` and ``k``/``v`` are expanded (stride 0) over the group.

The band becomes an ``attn_bias`` class, so no ``Sq × Sk`` tensor is built
(``shift = Sk - Sq``):

==========================================  =====================================================
band ``lo <= j - i <= hi``                   ``xformers.ops.fmha.attn_bias``
==========================================  =====================================================
unbounded                                   ``None``
``lo = None, hi = 0``                       ``LowerTriangularMask()`` (top-left causal)
``lo = None, hi = shift``                   ``LowerTriangularFromBottomRightMask()``
``lo <= shift, hi = shift``                 ``LowerTriangularFromBottomRightLocalAttentionMask(
                                            shift - lo + 1)``
any other band, a dense bias or bool mask   a dense additive tensor in q's dtype (materialized,
                                            said once in the log)
==========================================  =====================================================

``LowerTriangularFromBottomRightLocalAttentionMask`` takes one field, ``_window_size`` (there is
no ``window_left`` on it): xformers materializes it as ``tril(diagonal=shift)`` then
``triu(diagonal=shift - window_size + 1)``, i.e. ``shift - W + 1 <= j - i <= shift``, so
``W = shift - lo + 1`` (``lo = -(window - 1)`` with ``Sq = Sk`` gives ``W = window``); it rejects
``W <= 0``, so ``lo > shift`` goes dense.

xformers computes ``softmax(scale · q·kᵀ + attn_bias)`` (bias after scaling, as in our
reference). The log-sum-exp comes from ``xformers.ops.fmha.memory_efficient_attention_forward_
requires_grad`` (``(out, lse)``, ``lse`` float32 ``[B, H, Mq]`` or ``[B, G, H, Mq]``, possibly
padded along ``Mq``: sliced). Without that entry point the call is not served. Rows with no
visible key get ``lse = -inf`` and, like rows where a finite fill value matters, are recomputed
by the reference. Softcapping, float64, ``Dv != D`` and non-CUDA tensors are not served:
``attention_xformers`` returns None and the caller falls back (said once in the log).

Unverified on hardware: tested against a fake ``xformers`` that checks arguments against the
documented signature and computes the documented semantics; a real-xformers test runs only
where ``xformers.ops`` imports and CUDA is available.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
from torch import Tensor

from fa_dynamo.logs import warn_once
from fa_dynamo.kernels.alibi import alibi_as_bias
from fa_dynamo.kernels.exactness import recompute_unserved_rows
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.segments import segments_as_mask

log = logging.getLogger(__name__)

BIAS_ALIGN = 8  # xformers needs the dense attn_bias's row stride a multiple of 8 (slice a wider tensor)


def _xformers_ops():
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:
        return None




def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float) -> Optional[str]:
    """Why xformers cannot serve the call, or None."""
    xops = _xformers_ops()
    if xops is None:
        return "xformers is not importable"
    if not hasattr(xops.fmha, "memory_efficient_attention_forward_requires_grad"):
        return "this xformers has no memory_efficient_attention_forward_requires_grad (no log-sum-exp)"
    if softcap > 0:
        return "xformers' memory_efficient_attention has no softcap"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers' memory_efficient_attention does not compute {q.dtype}"
    if v.shape[-1] != q.shape[-1]:
        return f"the xformers mapping needs Dv == D, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}"
    return None


def bias_class(band: Band, num_q: int, num_k: int):
    """``(class name, args)`` of the attn_bias class for a band, ``(None, ())`` for no bias, or
    ``("dense", ())`` when the band must be materialized."""
    if band.is_unbounded:
        return None, ()
    lo, hi, shift = band.min_offset, band.max_offset, num_k - num_q
    if lo is None and hi == 0:
        return "LowerTriangularMask", ()
    if lo is None and hi == shift:
        return "LowerTriangularFromBottomRightMask", ()
    if lo is not None and hi == shift and shift - lo + 1 > 0:
        return "LowerTriangularFromBottomRightLocalAttentionMask", (shift - lo + 1,)
    return "dense", ()


def _dense_bias(bias, mask, band: Band, q, k, grouped: bool) -> torch.Tensor:
    """The additive ``attn_bias`` tensor in q's dtype: ``[B, H, Sq, Sk]`` (or ``[B, Hkv, G, Sq, Sk]``
    when grouped), the last dim padded to a multiple of 8 in memory and sliced."""
    batch, heads, num_q, _ = q.shape
    num_k, kv_heads = k.shape[2], k.shape[1]
    padded = -(-num_k // BIAS_ALIGN) * BIAS_ALIGN
    storage = torch.zeros(batch, heads, num_q, padded, dtype=q.dtype, device=q.device)
    dense = storage[..., :num_k]
    if bias is not None:
        dense += bias.to(q.dtype).expand(batch, heads, num_q, num_k)
    hidden = None
    if mask is not None:
        hidden = mask.expand(mask.shape[0], mask.shape[1], num_q, num_k)
    if not band.is_unbounded:
        band_hidden = band.hidden(torch.arange(num_q, device=q.device), torch.arange(num_k, device=q.device))
        hidden = band_hidden[None, None] if hidden is None else hidden | band_hidden
    if hidden is not None:
        dense.masked_fill_(hidden, float("-inf"))
    if grouped:
        dense = dense.unflatten(1, (kv_heads, heads // kv_heads))
    return dense


def _dead_rows(band: Band, bias, mask, q, k) -> torch.Tensor:
    """Bool broadcastable to ``[B, H, Sq]``: rows that see no key (or whose bias is all -inf)."""
    num_q, num_k = q.shape[2], k.shape[2]
    dead = band.empty_rows(num_q, num_k, q.device)[None, None]
    hidden = None
    if mask is not None:
        hidden = mask.expand(mask.shape[0], mask.shape[1], num_q, num_k)
    if bias is not None:
        bias_hidden = torch.isneginf(bias).expand(bias.shape[0], bias.shape[1], num_q, num_k)
        hidden = bias_hidden if hidden is None else hidden | bias_hidden
    if hidden is not None:
        if not band.is_unbounded:
            hidden = hidden | band.hidden(torch.arange(num_q, device=q.device), torch.arange(num_k, device=q.device))
        dead = dead | hidden.all(dim=-1)
    return dead


def attention_xformers(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], params: AttentionParams,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Same contract as ``attention_cpu``, or None when xformers cannot serve the call (the
    caller then falls back; the reason is logged once). Segment ids reach xformers as part of
    the dense bias (``segments_as_mask``)."""
    reason = unsupported_reason(q, k, v, params.softcap)
    if reason is not None:
        warn_once(log, f"{reason}; falling back from the xformers kernel")
        return None
    mask = segments_as_mask(mask, params.segments, "xformers")
    bias = alibi_as_bias(bias, params.alibi, q.shape[2], k.shape[2], "xformers")
    params = params.replace(segments=None, alibi=None)  # now in the dense mask and bias
    band = params.band
    batch, heads, num_q, _ = q.shape
    kv_heads, num_k = k.shape[1], k.shape[2]
    if min(batch, heads, num_q, num_k) == 0:
        return None
    fmha = _xformers_ops().fmha
    grouped = kv_heads != heads
    group = heads // kv_heads
    xq, xk, xv = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, S, H, D]
    if grouped:  # BMGHK: [B, S, Hkv, group, D], k/v broadcast over the group (stride 0)
        xq = xq.unflatten(2, (kv_heads, group))
        xk = xk.unsqueeze(3).expand(batch, num_k, kv_heads, group, k.shape[-1])
        xv = xv.unsqueeze(3).expand(batch, num_k, kv_heads, group, v.shape[-1])
    name, args = bias_class(band, num_q, num_k)
    if bias is not None or mask is not None or name == "dense":
        what = "a dense bias" if bias is not None else "a bool mask" if mask is not None else f"band {band}"
        warn_once(log, f"xformers gets {what} as a materialized Sq×Sk attn_bias tensor")
        attn_bias = _dense_bias(bias, mask, band, q, k, grouped)
    elif name is None:
        attn_bias = None
    else:
        attn_bias = getattr(fmha.attn_bias, name)(*args)
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        xq, xk, xv, attn_bias=attn_bias, p=0.0, scale=float(params.scale)
    )
    out = out.reshape(batch, num_q, heads, v.shape[-1]).transpose(1, 2).to(q.dtype).contiguous()
    lse = lse[..., :num_q].reshape(batch, heads, num_q).float()
    lse = lse.masked_fill(_dead_rows(band, bias, mask, q, k), float("-inf")).contiguous()
    recompute_unserved_rows(out, lse, q, k, v, bias, mask, params)
    return out, lse
