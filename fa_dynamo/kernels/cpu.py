"""The CPU kernel: tiled online softmax with a tiling-mask.

Two-level tiling. The outer tile is a block of ``block_q`` query rows; for it the band gives the
range of keys any row can see, cut into inner tiles of ``block_k`` keys, each classified by the
band and the segment ids (``segments.py``) as empty (skipped, never touched), full (no mask at
all) or partial (a ``block_q × block_k`` mask built from indices and ids); a dense mask's tiles
are classified at run time too, and skipped where it hides them whole (unfilled cache slots
behind a data mask). Consecutive full
tiles run as one segment (a run of keys, not a packed sequence); each segment is handed to the
fastest dense primitive, ATen's CPU flash kernel, which returns its log-sum-exp, and the
segments of an outer tile are merged exactly through their log-sum-exps (online softmax at
segment granularity). GQA maps query head ``h`` to key/value head ``h // G`` inside ATen's
kernel, without copies. Softcapping, value head dims unlike the query's, and float64
(which ATen's kernel does not compute to float64 accuracy) use GEMM tiles instead.

Rows the fast path cannot serve exactly — rows that see no key at all (eager gives NaN for
``-inf`` fills, a uniform average for finite fills), rows where a finite fill value is not
negligible, NaN the kernel did not read — are found from the log-sum-exp and the output, and
recomputed by the reference (``exactness.py``); each path says which keys it did not read.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fa_dynamo.kernels.exactness import aten_lse, merge_by_lse, recompute_unserved_rows
from fa_dynamo.kernels.gqa_packing import packed_attention, packs
from fa_dynamo.kernels.mask import Band, TileKind, dense_tile_kind
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import keys_of, masked_scores, reference_attention
from fa_dynamo.kernels.segments import SegmentTiles, combine

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu



def _slice_rows(t: Optional[torch.Tensor], q0: int, q1: int) -> Optional[torch.Tensor]:
    if t is None or t.shape[-2] == 1:
        return t
    return t[..., q0:q1, :]


class Problem:
    """One call's inputs and the segment primitives over them."""

    def __init__(self, q, k, v, bias, mask, params: AttentionParams):
        self.q, self.k, self.v = q, k, v
        self.bias, self.mask = bias, mask
        self.params = params
        self.band, self.segments, self.alibi = params.band, params.segments, params.alibi
        self.segment_tiles = None if params.segments is None else SegmentTiles(params.segments)

    def runs(self, q0: int, q1: int) -> list:
        """``(k0, k1, band_partial, segments_partial)``: the key runs rows ``[q0, q1)`` see (``_runs``)."""
        return _runs(self.band, self.segment_tiles, self.mask, q0, q1, self.k.shape[2], self.params.block_k)

    def additive_tile(self, q0: int, q1: int, k0: int, k1: int, with_band: bool, with_segments: bool
                      ) -> Optional[torch.Tensor]:
        """The float mask of the tile (dense bias + ALiBi + dense mask + band + segments), or None."""
        tile = None
        if self.bias is not None:
            tile = keys_of(_slice_rows(self.bias, q0, q1), k0, k1)
        if self.alibi is not None:  # summed with the bias in float32
            alibi = self.alibi.tile(q0, q1, k0, k1, torch.float32)
            tile = alibi if tile is None else tile.float() + alibi
        if tile is not None:
            tile = tile.to(self.q.dtype)
        hidden = keys_of(_slice_rows(self.mask, q0, q1), k0, k1)
        if with_band:
            band_hidden = self.band.hidden(torch.arange(q0, q1), torch.arange(k0, k1))
            hidden = band_hidden if hidden is None else hidden | band_hidden
        if with_segments:
            segment_hidden = self.segments.tile(q0, q1, k0, k1).hidden()
            hidden = segment_hidden if hidden is None else hidden | segment_hidden
        if hidden is not None:
            hidden_add = torch.zeros(hidden.shape, dtype=self.q.dtype).masked_fill_(hidden, float("-inf"))
            tile = hidden_add if tile is None else tile + hidden_add
        return tile

    def segment(self, q0: int, q1: int, k0: int, k1: int, with_band: bool, with_segments: bool):
        """Attention of rows ``[q0, q1)`` over keys ``[k0, k1)``: ``(out, lse)`` in the compute dtype.

        Rows with no visible key in the segment get ``lse = -inf`` and contribute nothing.
        """
        q_t = self.q[:, :, q0:q1]
        k_s, v_s = self.k[:, :, k0:k1], self.v[:, :, k0:k1]
        if not aten_serves(self.q, self.v, self.params.softcap):
            return self._gemm_segment(q_t, k_s, v_s, q0, q1, k0, k1, with_band, with_segments)
        tile = self.additive_tile(q0, q1, k0, k1, with_band, with_segments)
        out, lse = _flash_cpu(q_t, k_s, v_s, 0.0, False, attn_mask=tile, scale=self.params.scale)
        dead = None if tile is None else torch.isneginf(tile).all(-1).expand(lse.shape)
        return out.float(), aten_lse(lse, dead)

    def _gemm_segment(self, q_t, k_s, v_s, q0, q1, k0, k1, with_band, with_segments):
        tile_params = self.params.replace(
            fill=float("-inf"), band=self.band if with_band else Band(),
            segments=self.segments.tile(q0, q1, k0, k1) if with_segments else None,
        )
        s = masked_scores(
            q_t, k_s, torch.arange(q0, q1),
            keys_of(_slice_rows(self.bias, q0, q1), k0, k1), keys_of(_slice_rows(self.mask, q0, q1), k0, k1),
            tile_params, k0,
        )
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isneginf(m), 0.0, m))
        total = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p / torch.where(total == 0, 1.0, total), v_s.to(s.dtype).unsqueeze(2))
        lse = (m + torch.log(total)).squeeze(-1)
        return out.flatten(1, 2), lse.flatten(1, 2)


def aten_serves(q: torch.Tensor, v: torch.Tensor, softcap: float) -> bool:
    """ATen's flash kernel cannot softcap, needs D == Dv, and is not float64-accurate."""
    return softcap == 0 and q.dtype != torch.float64 and q.shape[-1] == v.shape[-1]


def _runs(band: Band, segment_tiles: Optional[SegmentTiles], mask: Optional[torch.Tensor], q0: int, q1: int,
          num_keys: int, block_k: int):
    """``(k0, k1, band_partial, segments_partial)`` runs covering the visible keys of rows
    ``[q0, q1)``: empty tiles (by the band, the segment ids or, read at run time, a dense mask)
    dropped, consecutive full tiles joined."""
    k_lo, k_hi = band.key_range(q0, q1, num_keys)
    runs: list[list] = []
    for t0 in range(k_lo, k_hi, block_k):
        t1 = min(t0 + block_k, k_hi)
        band_kind = band.classify(q0, q1, t0, t1)
        seg_kind = TileKind.FULL if segment_tiles is None else segment_tiles.classify(q0, q1, t0, t1)
        kind = combine(band_kind, seg_kind)
        if kind is not TileKind.EMPTY and dense_tile_kind(mask, q0, q1, t0, t1) is TileKind.EMPTY:
            continue  # the dense mask is still applied to the tiles that are kept
        if kind is TileKind.EMPTY:
            continue
        flags = [band_kind is TileKind.PARTIAL, seg_kind is TileKind.PARTIAL]
        if runs and kind is TileKind.FULL and not any(runs[-1][2:]) and runs[-1][1] == t0:
            runs[-1][1] = t1
        else:
            runs.append([t0, t1, *flags])
    return runs


def attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], params: AttentionParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference_attention``; memory O(block_q × block_k) beyond the inputs."""
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    if num_q == 0 or num_k == 0:
        return reference_attention(q, k, v, bias, mask, params)
    block_q = params.block_q
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    if aten_serves(q, v, params.softcap) and packs(q, k, params):  # decode: K/V read once per group
        packed = packed_attention(q, k, v, bias, mask, params)
        if packed is not None:
            out, lse, (k0, k1), (m0, m1) = packed
            recompute_unserved_rows(out, lse, q, k, v, bias, mask, params, unread_keys=[(0, k0), (k1, num_k)],
                                    biased_keys=[(m0, k0), (k1, m1)])
            return out, lse

    # Whole-call fast path. Rows with no visible key (ATen returns 0 with lse 0 there) are written
    # directly; other unserved rows recomputed.
    causal = whole_call(q, k, v, bias, mask, params)
    if causal is not None:
        additive = key_additive(bias, mask, q.dtype)
        out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=additive, scale=params.scale)
        lse = aten_lse(lse)
        settled = None
        if additive is not None:  # rows with no key: known without scores (padding rows are many)
            settled = _rows_without_keys(additive, num_q, causal=causal).expand(batch, heads, num_q)
            _fill_rows_without_keys(out, lse, v, settled, params.fill)
        # top-left causal: ATen stops each row's block at its last key, so row 0 reads key 0 only
        recompute_unserved_rows(out, lse, q, k, v, bias, mask, params, settled=settled,
                                unread_keys=[(1, num_k)] if causal else [])
        return out, lse

    problem = Problem(q, k, v, bias, mask, params)
    out = q.new_empty(batch, heads, num_q, v.shape[-1])
    lse = torch.empty(batch, heads, num_q, dtype=torch.float32)
    read_by_all = [(0, num_k)]  # keys every query tile read (tiles that read none are unserved)
    for q0 in range(0, num_q, block_q):
        q1 = min(q0 + block_q, num_q)
        acc, acc_lse = None, None
        runs = problem.runs(q0, q1)
        for k0, k1, band_partial, segments_partial in runs:
            segment_out = problem.segment(q0, q1, k0, k1, band_partial, segments_partial)
            acc, acc_lse = merge_by_lse(acc, acc_lse, *segment_out)
        if acc is None:
            lse[:, :, q0:q1] = float("-inf")
            continue
        read_by_all = _intersect(read_by_all, [(k0, k1) for k0, k1, *_ in runs])
        out[:, :, q0:q1] = acc
        lse[:, :, q0:q1] = acc_lse.float()

    recompute_unserved_rows(out, lse, q, k, v, bias, mask, params, unread_keys=_complement(read_by_all, num_k))
    return out, lse


def whole_call(q, k, v, bias, mask, params: AttentionParams) -> Optional[bool]:
    """``is_causal`` of the one ATen call that serves the whole problem (True: top-left causal,
    False: no band), or None where none does. ATen's kernel is top-left causal or unmasked and
    takes an additive mask that varies along the keys only (key padding: O(Sk), never Sq×Sk);
    a band that hides nothing here (decode's bottom-right causal band) is no band."""
    band, num_q, num_k = params.band, q.shape[2], k.shape[2]
    if band.classify(0, num_q, 0, num_k) is TileKind.FULL:
        band = Band()
    key_only = all(t is None or t.shape[-2] == 1 for t in (bias, mask))
    if (aten_serves(q, v, params.softcap) and key_only and params.segments is None and params.alibi is None
            and band.min_offset is None and band.max_offset in (None, 0)):
        return band.max_offset == 0
    return None


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint ``[k0, k1)`` ranges."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _complement(ranges: list[tuple[int, int]], num_keys: int) -> list[tuple[int, int]]:
    """The keys of ``[0, num_keys)`` outside sorted disjoint ``ranges``."""
    bounds = [0] + [x for r in ranges for x in r] + [num_keys]
    return [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2) if bounds[i] < bounds[i + 1]]


def key_additive(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """A ``[B|1, H|1, 1, Sk]`` bias and bool mask (True = hidden) as one additive mask in ``dtype``."""
    if bias is None and mask is None:
        return None
    additive = torch.zeros((), dtype=dtype) if bias is None else bias.to(dtype)
    return additive if mask is None else additive.masked_fill(mask, float("-inf"))


def _rows_without_keys(additive: torch.Tensor, num_q: int, causal: bool) -> torch.Tensor:
    """Bool ``[B|1, H|1, Sq]``: rows for which a key-only additive mask (and the top-left causal
    band) leaves no key visible."""
    visible = ~torch.isneginf(additive[..., 0, :])  # [B|1, H|1, Sk]
    if not causal:
        return (~visible.any(-1, keepdim=True)).expand(*visible.shape[:-1], num_q)
    seen = visible.cumsum(-1) > 0  # row i sees keys 0..i
    last_key = torch.arange(num_q).clamp(max=visible.shape[-1] - 1)
    return ~seen.index_select(-1, last_key)


def _fill_rows_without_keys(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                            fill: float) -> None:
    """Rows ``[B, H, Sq]`` in which the mask hides every key (in place): every score is ``fill``,
    so softmax is NaN for ``-inf`` and uniform otherwise (the mean of the values, lse
    ``fill + log(Sk)``), as the reference computes, without the reference's Sq×Sk scores."""
    if not bool(rows.any()):
        return
    if math.isinf(fill):
        value, row_lse = torch.full((), float("nan"), dtype=out.dtype), float("-inf")
    else:
        value = v.float().mean(dim=2, keepdim=True).repeat_interleave(out.shape[1] // v.shape[1], dim=1).to(out.dtype)
        row_lse = fill + math.log(v.shape[2])
    out.copy_(torch.where(rows.unsqueeze(-1), value, out))
    lse.masked_fill_(rows, row_lse)


def attention_sdpa(q, k, v, bias, mask, params: AttentionParams):
    """The peer strategy: one ATen flash call with the whole Sq×Sk mask materialized.

    Kept as a selectable kernel (``FA_DYNAMO_KERNEL=sdpa``) to measure what tiling buys; it
    serves the same semantics (what ATen cannot serve goes through the tiled kernel's GEMM tiles).
    """
    num_q, num_k = q.shape[2], k.shape[2]
    if not aten_serves(q, v, params.softcap) or num_q == 0 or num_k == 0:
        return attention_cpu(q, k, v, bias, mask, params)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    problem = Problem(q, k, v, bias, mask, params)
    out, lse = problem.segment(0, num_q, 0, num_k, with_band=not params.band.is_unbounded,
                               with_segments=params.segments is not None)
    out = out.to(q.dtype)
    recompute_unserved_rows(out, lse, q, k, v, bias, mask, params, unread_keys=[])
    return out, lse
