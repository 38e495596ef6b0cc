"""GQA packing for short query chunks (decode, speculative decoding, chunked prefill) on CPU.

A decode step reads all of K/V for a handful of query rows, so it is bound by memory. ATen's
CPU flash kernel maps each query head to its K/V head, which reads the K/V of a group once per
query head: G times. Packing folds the G query heads of a group into the rows of one problem
(row ``g·Sq + i`` is query ``i`` of the group's head ``g``, keeping its position ``i`` for the
band), so K/V are read once per group (and, when that leaves cores idle, cut across them:
``split_keys.py``). In float32 or bfloat16 with up to 16 rows the call goes to the C++ decode
kernel (``decode_kernel.py``), else to ATen's. Only the keys some row can see are handed over (a
view of the cache, never a copy); the band's partial rows, the dense bias and the mask become
one additive ``[B|1, Hkv|1, G·Sq, keys]`` mask, small next to K/V for short chunks.

Rows this cannot serve exactly (no visible key, non-negligible finite fills) are left to the
caller's ``recompute_unserved_rows``, as for every CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch

from fa_dynamo.kernels.decode_kernel import decode_attention, decode_kernel_serves
from fa_dynamo.kernels.exactness import aten_lse
from fa_dynamo.kernels.mask import TileKind
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import keys_of
from fa_dynamo.kernels.split_keys import key_splits, split_key_attention

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

PACK_MAX_ROWS = 64
"""Packed rows (G·Sq) at most: beyond this the rows amortize the K/V reads themselves, and the
packed mask (rows × keys) would stop being small next to K/V."""


def packs(q: torch.Tensor, k: torch.Tensor, params: AttentionParams) -> bool:
    """Whether a call takes the packed path: grouped heads, a short query chunk, and only the
    structures the additive mask expresses (no segment ids, no ALiBi)."""
    group = q.shape[1] // k.shape[1]
    return (group > 1 and q.shape[2] * group <= PACK_MAX_ROWS and params.segments is None
            and params.alibi is None)


def packed_attention(q, k, v, bias, mask, params: AttentionParams):
    """``(out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32, (k0, k1), (m0, m1))`` from
    one ATen call over the packed rows (see module doc), or None when no row sees a key: keys
    ``[k0, k1)`` were read, and ``[m0, m1) ⊇ [k0, k1)`` is what the band and mask left (the rest
    of it was cut because a ``-inf`` bias hides it)."""
    batch, heads, num_q, dim = q.shape
    kv_heads, num_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    (k0, k1), (m0, m1) = visible_keys(bias, mask, params, num_q, num_k)
    if k1 <= k0:
        return None
    rows = group * num_q
    packed_q = q.reshape(batch, kv_heads, rows, dim)  # head h = kv·G + g: rows g·Sq + i of K/V head kv
    additive = _packed_mask(bias, mask, params, q, kv_heads, k0, k1)
    k_s, v_s = k[:, :, k0:k1], v[:, :, k0:k1]
    splits = key_splits(batch * kv_heads, k1 - k0, torch.get_num_threads())
    split = None
    if decode_kernel_serves(packed_q, k_s, v_s, rows):
        split = decode_attention(packed_q, k_s, v_s, additive, params.scale, splits)
    elif splits > 1:
        split = split_key_attention(packed_q, k_s, v_s, additive, params.scale, splits)
    if split is not None:
        out, lse = split
    else:
        out, lse = _flash_cpu(packed_q, k_s, v_s, 0.0, False, attn_mask=additive, scale=params.scale)
        lse = aten_lse(lse, None if additive is None else torch.isneginf(additive).all(-1).expand(lse.shape))
    return out.reshape(batch, heads, num_q, v.shape[-1]), lse.reshape(batch, heads, num_q), (k0, k1), (m0, m1)


def visible_keys(bias, mask, params: AttentionParams, num_q: int, num_k: int):
    """``(k0, k1), (m0, m1)``: keys outside which no row sees a key — the band's range, narrowed
    to the keys a dense mask leaves visible to some row (a static cache's unfilled slots) as
    ``[m0, m1)``, then to those a ``-inf`` bias leaves visible as ``[k0, k1)``."""
    k0, k1 = params.band.key_range(0, num_q, num_k)
    ranges = []
    for t, hides in ((mask, lambda m: m), (bias, torch.isneginf)):
        if t is not None and t.shape[-1] != 1 and k1 > k0:
            seen = (~hides(t[..., k0:k1])).flatten(0, 2).any(0).nonzero()
            k0, k1 = (k0, k0) if seen.numel() == 0 else (k0 + int(seen[0]), k0 + int(seen[-1]) + 1)
        ranges.append((k0, k1))
    return ranges[1], ranges[0]


def _packed_mask(bias, mask, params: AttentionParams, q, kv_heads: int, k0: int, k1: int) -> Optional[torch.Tensor]:
    """The bias, the mask and the band over keys ``[k0, k1)`` as one additive mask on the packed
    rows, in q's dtype (as the tiled path adds them), or None when nothing is hidden or added."""
    num_q, group = q.shape[2], q.shape[1] // kv_heads
    additive = None
    if bias is not None:
        additive = _pack_rows(keys_of(bias, k0, k1), kv_heads, group, num_q).to(q.dtype)
    hidden = None
    if mask is not None:
        hidden = _pack_rows(keys_of(mask, k0, k1), kv_heads, group, num_q)
    if params.band.classify(0, num_q, k0, k1) is not TileKind.FULL:
        positions = torch.arange(num_q).repeat(group)  # packed row g·Sq + i is query i
        band_hidden = params.band.hidden(positions, torch.arange(k0, k1))[None, None]
        hidden = band_hidden if hidden is None else hidden | band_hidden
    if hidden is not None:
        hidden_add = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))
        additive = hidden_add if additive is None else additive + hidden_add
    return None if additive is None else additive.expand(*additive.shape[:3], k1 - k0)


def _pack_rows(t: torch.Tensor, kv_heads: int, group: int, num_q: int) -> torch.Tensor:
    """A ``[B|1, Hq|1, Sq|1, keys]`` bias or mask on the packed rows: ``[B|1, Hkv|1, G·Sq|1, keys]``."""
    if t.shape[1] == 1:
        if t.shape[2] == 1:
            return t  # the same for every row of every head
        return t.repeat(1, 1, group, 1)  # every head of a group reads the same rows
    t = t.expand(t.shape[0], t.shape[1], num_q, t.shape[3])
    return t.reshape(t.shape[0], kv_heads, group * num_q, t.shape[3])
