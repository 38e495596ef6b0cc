"""``AttentionParams``: everything the op's kernels read besides q, k, v and the dense bias/mask.

The custom op's schema is flat (``torch.library`` takes no objects); the op builds this once
from its arguments and hands it to whichever kernel serves the call, forward or backward.
Kernels read fields by name, so an operand added to the op changes this class and the kernels
that use it, not every signature between them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from fa_dynamo.kernels.alibi import Alibi
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.segments import Segments


@dataclass(frozen=True, eq=False)
class AttentionParams:
    """How scores are formed and masked (see ``reference.py``) and how kernels tile them."""

    scale: float
    softcap: float = 0.0  # > 0: scores become softcap · tanh(scores / softcap)
    fill: float = float("-inf")  # what a hidden score is replaced with
    band: Band = Band()
    block_q: int = 256  # outer (query) tile
    block_k: int = 512  # inner (key) tile
    segments: Optional[Segments] = None
    alibi: Optional[Alibi] = None
    zero_empty_rows: bool = False  # a row that sees no key gives 0 (SDPA), not NaN (softmax)
    fill_added: bool = False  # the fill is added to hidden scores (eager's additive mask), not written over them

    @staticmethod
    def of(
        scale: float, softcap: float, fill: float, min_offset: Optional[int], max_offset: Optional[int],
        block_q: int, block_k: int, q_segments: Optional[torch.Tensor] = None,
        k_segments: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
        zero_empty_rows: bool = False, fill_added: bool = False,
    ) -> "AttentionParams":
        """From the op's flat arguments."""
        return AttentionParams(scale, softcap, fill, Band(min_offset, max_offset), block_q, block_k,
                               Segments.of(q_segments, k_segments), Alibi.of(alibi_slopes), zero_empty_rows,
                               fill_added)

    def op_arguments(self) -> dict:
        """The flat arguments ``of`` takes, by name (for calling a custom op with these params)."""
        seg, alibi = self.segments, self.alibi
        return dict(scale=self.scale, softcap=self.softcap, fill=self.fill, min_offset=self.band.min_offset,
                    max_offset=self.band.max_offset, block_q=self.block_q, block_k=self.block_k,
                    q_segments=None if seg is None else seg.q, k_segments=None if seg is None else seg.k,
                    alibi_slopes=None if alibi is None else alibi.slopes, zero_empty_rows=self.zero_empty_rows,
                    fill_added=self.fill_added)

    def replace(self, **changes) -> "AttentionParams":
        return dataclasses.replace(self, **changes)

    def rows(self, idx: torch.Tensor) -> "AttentionParams":
        """The parameters of query rows ``idx`` (segment ids are per row; the rest is not)."""
        return self if self.segments is None else self.replace(segments=self.segments.rows(idx))

    @property
    def is_masked(self) -> bool:
        """Whether the band or the segments hide any score (a dense mask is the caller's to add)."""
        return self.segments is not None or not self.band.is_unbounded
