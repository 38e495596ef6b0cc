"""The reference semantics of ``fa_dynamo::attention``, written as dense torch math.

Every kernel must compute what this file computes. It is also the exact path the fast kernels
use for the rare rows they cannot serve (rows with no visible key, non-negligible fill values)
and, tile by tile, for the backward pass.

For query row ``i`` and key ``j`` of head ``h`` (key/value head ``h // (Hq // Hkv)``)::

    s = (q[i] · k[j]) * scale
    s = softcap * tanh(s / softcap)          if softcap > 0
    s = s + bias[i, j]                       if bias is given (broadcast to [B, Hq, Sq, Sk])
    s = s + slopes[h] * (j - i)              if alibi is given (``alibi.py``)
    s = fill   where mask[i, j], the band or the segments hide (i, j)   (replace, as masked_fill does)
    out[i] = softmax_j(s) · v

computed in float32 (float64 for float64 inputs), so a row whose scores are all ``-inf`` gives
NaN exactly as eager PyTorch does (0 with ``zero_empty_rows``, as SDPA's ``_safe_softmax``
does), and a row filled with a finite value averages ``v`` uniformly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fa_dynamo.kernels.params import AttentionParams


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_heads(t: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """View a ``[B, H or 1, ...]`` tensor as ``[B, Hkv or 1, H/Hkv or 1, ...]`` (no copy)."""
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (num_kv_heads, t.shape[1] // num_kv_heads))


def rows_of(t: Optional[torch.Tensor], q_idx: torch.Tensor) -> Optional[torch.Tensor]:
    """Select query rows ``q_idx`` of a ``[.., Sq or 1, Sk]`` bias/mask, keeping broadcasts."""
    if t is None or t.shape[-2] == 1:
        return t
    return t.index_select(-2, q_idx)


def keys_of(t: Optional[torch.Tensor], k0: int, k1: int) -> Optional[torch.Tensor]:
    """Keys ``[k0, k1)`` of a ``[.., Sk or 1]`` bias/mask (a view), keeping broadcasts."""
    if t is None or t.shape[-1] == 1:
        return t
    return t[..., k0:k1]


def masked_scores(
    q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], params: AttentionParams, k_start: int = 0,
) -> torch.Tensor:
    """Scores ``[B, Hkv, G, len(q_idx), Sk]`` in the compute dtype, masked as documented above.

    ``q`` holds the rows ``q_idx`` of the full query (``[B, Hq, len(q_idx), D]``) and ``k`` the
    keys ``k_start, k_start + 1, ...``; ``bias``, ``mask`` and ``params.segments`` are already
    restricted to those rows and keys.
    """
    scale, softcap, fill, alibi = params.scale, params.softcap, params.fill, params.alibi
    num_kv_heads = k.shape[1]
    ct = compute_dtype(q.dtype)
    s = torch.matmul(group_heads(q.to(ct), num_kv_heads), k.to(ct).unsqueeze(2).transpose(-1, -2))
    s = s * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + group_heads(bias, num_kv_heads).to(ct)
    k_idx = torch.arange(k_start, k_start + k.shape[2], device=q.device)
    if alibi is not None:
        s = s + group_heads(alibi.scores(q_idx, k_idx, ct), num_kv_heads)
    hidden = hidden_scores(q_idx, k_idx, mask, params, num_kv_heads)
    if hidden is not None:  # added: the same value (fill absorbs s), but gradient and NaN flow through
        s = torch.where(hidden, s + fill, s) if params.fill_added else s.masked_fill(hidden, fill)
    return s


def hidden_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, mask: Optional[torch.Tensor], params: AttentionParams,
                  num_kv_heads: int) -> Optional[torch.Tensor]:
    """Bool, broadcastable to ``[B, Hkv, G, len(q_idx), len(k_idx)]``: the scores the mask, the band
    and the segment ids replace with the fill (``mask`` and ``params.segments`` already restricted
    to those rows and keys), or None where nothing is hidden."""
    hidden = None
    if mask is not None:
        hidden = group_heads(mask, num_kv_heads)
    if not params.band.is_unbounded:
        band_hidden = params.band.hidden(q_idx, k_idx)
        hidden = band_hidden if hidden is None else hidden | band_hidden
    if params.segments is not None:
        segment_hidden = group_heads(params.segments.hidden(), num_kv_heads)
        hidden = segment_hidden if hidden is None else hidden | segment_hidden
    return hidden


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], params: AttentionParams,
    q_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention: ``(out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32)``.

    With ``q_idx``, ``q``, ``bias``, ``mask`` and ``params`` hold only those query rows (see
    ``rows_of`` and ``AttentionParams.rows``).
    """
    if q_idx is None:
        q_idx = torch.arange(q.shape[2], device=q.device)
    s = masked_scores(q, k, q_idx, bias, mask, params)
    p = torch.ops.aten._safe_softmax(s, -1) if params.zero_empty_rows else torch.softmax(s, dim=-1)
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    lse = torch.logsumexp(s, dim=-1)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2).float()
