"""The tiling-mask: a structural description of which keys each query may see.

A band ``min_offset <= j - i <= max_offset`` (query row ``i``, key column ``j``, either bound
may be absent) covers causal masks with any offset (``max_offset = 0`` is top-left causal,
``max_offset = Sk - Sq`` bottom-right) and sliding windows (``min_offset = -(window - 1)``).
Kernels never build an Sq×Sk mask from it: they classify tiles as empty / full / partial and
build the mask of a partial tile from indices.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch


class TileKind(enum.Enum):
    EMPTY = 0  # every (i, j) masked: the tile is skipped
    FULL = 1  # no (i, j) masked: no mask is evaluated
    PARTIAL = 2  # some masked: the mask is built from indices


@dataclass(frozen=True)
class Band:
    """Key ``j`` is visible to query ``i`` iff ``min_offset <= j - i <= max_offset``."""

    min_offset: Optional[int] = None
    max_offset: Optional[int] = None

    @property
    def is_unbounded(self) -> bool:
        return self.min_offset is None and self.max_offset is None

    def shifted(self, k0: int) -> "Band":
        """The same band over keys renumbered from ``k0`` (key ``k0 + j`` becomes key ``j``)."""
        return Band(None if self.min_offset is None else self.min_offset - k0,
                    None if self.max_offset is None else self.max_offset - k0)

    def classify(self, q0: int, q1: int, k0: int, k1: int) -> TileKind:
        """Kind of the tile of rows ``[q0, q1)`` and columns ``[k0, k1)`` (both non-empty)."""
        low_diff, high_diff = k0 - (q1 - 1), (k1 - 1) - q0
        if (self.min_offset is not None and high_diff < self.min_offset) or (
            self.max_offset is not None and low_diff > self.max_offset
        ):
            return TileKind.EMPTY
        if (self.min_offset is None or low_diff >= self.min_offset) and (
            self.max_offset is None or high_diff <= self.max_offset
        ):
            return TileKind.FULL
        return TileKind.PARTIAL

    def key_range(self, q0: int, q1: int, num_keys: int) -> tuple[int, int]:
        """Columns ``[k0, k1)`` that any row of ``[q0, q1)`` can see (may be empty)."""
        k0 = 0 if self.min_offset is None else max(0, q0 + self.min_offset)
        k1 = num_keys if self.max_offset is None else min(num_keys, q1 - 1 + self.max_offset + 1)
        return k0, max(k0, k1)

    def empty_rows(self, num_q: int, num_k: int, device=None) -> torch.Tensor:
        """Bool ``[Sq]``: rows whose band holds no key at all (``[lo, hi]`` clipped to the keys is empty)."""
        i = torch.arange(num_q, device=device)
        lo = torch.zeros_like(i) if self.min_offset is None else (i + self.min_offset).clamp(min=0)
        hi = torch.full_like(i, num_k - 1) if self.max_offset is None else (i + self.max_offset).clamp(max=num_k - 1)
        return lo > hi

    def hidden(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Bool ``[len(q_idx), len(k_idx)]``: True where the key is masked out."""
        diff = k_idx[None, :] - q_idx[:, None]
        out = torch.zeros(diff.shape, dtype=torch.bool, device=diff.device)
        if self.min_offset is not None:
            out |= diff < self.min_offset
        if self.max_offset is not None:
            out |= diff > self.max_offset
        return out


def dense_tile_kind(mask: Optional[torch.Tensor], q0: int, q1: int, k0: int, k1: int) -> TileKind:
    """A dense bool mask's tile (True = hidden), classified at run time: EMPTY when it hides the
    tile for every batch and head (unfilled cache slots, other sequences), so the tile is skipped,
    FULL when it hides nothing there. One reduction over the tile's mask bytes."""
    if mask is None:
        return TileKind.FULL
    rows = mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]
    tile = rows if rows.shape[-1] == 1 else rows[..., k0:k1]
    if bool(tile.all()):
        return TileKind.EMPTY
    return TileKind.PARTIAL if bool(tile.any()) else TileKind.FULL
