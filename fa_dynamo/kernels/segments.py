"""Segment masks: per-row sequence ids instead of an Sq×Sk mask.

Packed sequences (several documents in one batch row) and chunked attention (Llama 4's
``i // chunk == j // chunk``) hide key ``j`` from query ``i`` of batch ``b`` unless
``q_segments[b, i] == k_segments[b, j]``. The op receives the two id vectors (``[B, Sq]`` and
``[B, Sk]``, O(S)); kernels build each tile's mask from them and, when the ids never decrease
along the sequence (checked once per call), skip the tiles whose query and key id ranges do
not overlap. Kernels without native support turn them into a dense boolean mask through
``segments_as_mask``, the one fallback, said once in the log.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from fa_dynamo.logs import warn_once
from fa_dynamo.kernels.mask import TileKind

log = logging.getLogger(__name__)


class Segments(NamedTuple):
    """Key ``j`` is visible to query ``i`` of batch ``b`` only if ``q[b, i] == k[b, j]``."""

    q: torch.Tensor  # [B, Sq] integer ids
    k: torch.Tensor  # [B, Sk] integer ids

    @staticmethod
    def of(q_segments: Optional[torch.Tensor], k_segments: Optional[torch.Tensor]) -> Optional["Segments"]:
        return None if q_segments is None else Segments(q_segments, k_segments)

    def rows(self, idx: torch.Tensor) -> "Segments":
        """The query rows ``idx`` (keys unchanged)."""
        return Segments(self.q.index_select(1, idx), self.k)

    def tile(self, q0: int, q1: int, k0: int, k1: int) -> "Segments":
        return Segments(self.q[:, q0:q1], self.k[:, k0:k1])

    def key_runs(self) -> Optional[torch.Tensor]:
        """``[B, Sq, 2]`` int32: for each query, the keys ``[first, last + 1)`` holding its id
        (a contiguous run when the key ids never decrease), or None when they are unsorted."""
        return _runs(self.k, self.q)

    def query_runs(self) -> Optional[torch.Tensor]:
        """``[B, Sk, 2]`` int32: for each key, the queries holding its id (see ``key_runs``)."""
        return _runs(self.q, self.k)

    def hidden(self) -> torch.Tensor:
        """Bool ``[B, 1, Sq, Sk]``: True where the ids differ (the key is masked out)."""
        return (self.q[:, :, None] != self.k[:, None, :]).unsqueeze(1)


def _runs(ids: torch.Tensor, of: torch.Tensor) -> Optional[torch.Tensor]:
    if ids.shape[1] > 1 and not bool((ids[:, 1:] >= ids[:, :-1]).all()):
        return None
    ids, of = ids.contiguous(), of.to(ids.dtype).contiguous()
    first = torch.searchsorted(ids, of, right=False)
    return torch.stack([first, torch.searchsorted(ids, of, right=True)], dim=-1).to(torch.int32).contiguous()


def combine(a: TileKind, b: TileKind) -> TileKind:
    """The kind of a tile under two masks at once (a key is visible iff both show it)."""
    if TileKind.EMPTY in (a, b):
        return TileKind.EMPTY
    return TileKind.FULL if a is b is TileKind.FULL else TileKind.PARTIAL


class SegmentTiles:
    """Tile classification from segment ids, prepared once per call in O(B × S).

    With ids non-decreasing along both sequences, a tile's ids span ``[first, last]`` on each
    side: the tile is empty when the spans do not overlap in any batch row and full when both
    hold one and the same id in every batch row. Unsorted ids make every tile partial.
    """

    def __init__(self, segments: Segments):
        q, k = segments.q, segments.k
        self.sorted = bool((q[:, 1:] >= q[:, :-1]).all()) and bool((k[:, 1:] >= k[:, :-1]).all())
        self.q_ids = q.tolist() if self.sorted else None
        self.k_ids = k.tolist() if self.sorted else None

    def classify(self, q0: int, q1: int, k0: int, k1: int) -> TileKind:
        """Kind of the tile of rows ``[q0, q1)`` and columns ``[k0, k1)`` (both non-empty)."""
        if not self.sorted:
            return TileKind.PARTIAL
        empty = full = True
        for qs, ks in zip(self.q_ids, self.k_ids):
            q_lo, q_hi, k_lo, k_hi = qs[q0], qs[q1 - 1], ks[k0], ks[k1 - 1]
            empty = empty and (q_hi < k_lo or k_hi < q_lo)
            full = full and q_lo == q_hi == k_lo == k_hi
        return TileKind.EMPTY if empty else TileKind.FULL if full else TileKind.PARTIAL




def segments_as_mask(mask: Optional[torch.Tensor], segments: Optional[Segments], kernel: str) -> Optional[torch.Tensor]:
    """The dense fallback for kernels without segment support: ``mask | segments.hidden()``.

    This materializes a ``[B, 1 or H, Sq, Sk]`` bool tensor, which is what segments exist to
    avoid; it is said once per kernel.
    """
    if segments is None:
        return mask
    warn_once(log, f"the {kernel} kernel has no segment (packed/chunked) masks; "
              "materializing them as a dense [B, 1, Sq, Sk] mask")
    hidden = segments.hidden()
    return hidden if mask is None else mask | hidden
