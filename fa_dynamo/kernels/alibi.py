"""ALiBi as a structure: per-head slopes instead of an Sq×Sk bias tensor.

ALiBi (Press et al.) adds ``slope[h] · (j − i)`` to the score of query ``i`` and key ``j``; a
model that spells it ``slope · j`` (BLOOM, MPT) or ``−slope · |i − j|`` under a causal mask
computes the same attention, as softmax ignores a constant added to a whole row. The op
receives the slopes (``[B or 1, H or 1]``, O(B·H)); kernels compute each tile's bias from indices
and never hold more than a tile of it. Kernels without native support add it to their dense
bias through ``alibi_as_bias``, the one fallback, said once in the log.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from fa_dynamo.logs import warn_once

log = logging.getLogger(__name__)


class Alibi(NamedTuple):
    """The bias ``slopes[b, h] · (j − i)``; ``slopes`` is ``[B or 1, H or 1]``, floating point."""

    slopes: torch.Tensor

    @staticmethod
    def of(slopes: Optional[torch.Tensor]) -> Optional["Alibi"]:
        return None if slopes is None else Alibi(slopes)

    def scores(self, q_idx: torch.Tensor, k_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The bias of rows ``q_idx`` and keys ``k_idx``: ``[B or 1, H or 1, len(q_idx), len(k_idx)]``."""
        distance = (k_idx[None, :] - q_idx[:, None]).to(dtype)
        return self.slopes.to(dtype)[:, :, None, None] * distance

    def tile(self, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype) -> torch.Tensor:
        device = self.slopes.device
        return self.scores(torch.arange(q0, q1, device=device), torch.arange(k0, k1, device=device), dtype)




def alibi_as_bias(bias: Optional[torch.Tensor], alibi: Optional[Alibi], num_q: int, num_k: int,
                  kernel: str) -> Optional[torch.Tensor]:
    """The dense fallback for kernels without ALiBi support: ``bias + slopes · (j − i)``.

    This materializes a ``[B, H, Sq, Sk]`` float32 tensor, which is what the slopes exist to
    avoid; it is said once per kernel.
    """
    if alibi is None:
        return bias
    warn_once(log, f"the {kernel} kernel has no structural ALiBi; materializing it as a dense "
              "[B, H, Sq, Sk] bias")
    dense = alibi.tile(0, num_q, 0, num_k, torch.float32)
    return dense if bias is None else bias.float() + dense
