"""What the attention matcher found at one site: the operands and the folded score chain.

Shared by matching (``fuse.py``), folding the score chain (``score_chain.py``) and
rewriting (``rewrite.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch.fx as fx

from fa_dynamo.passes.attention.mask_lifting import Offset

class NotFusable(Exception):
    """Raised inside matching with the reason a site is left alone."""


Scalar = Union[float, fx.Node]


@dataclass
class Operand:
    """A matmul operand in canonical layout ``[*batch, seq, dim]`` plus how to get there."""

    node: fx.Node
    permute: Optional[list[int]] = None  # applied to ``node`` first
    transpose_last: bool = False  # then swap the last two dims


@dataclass(frozen=True)
class AlibiTerm:
    """An additive bias read as ``slope · (j − i)`` (``mask_lifting.Slope``): the op gets
    ``factor · scale`` as its ALiBi slopes. ``exact`` when the bias is that and nothing more;
    otherwise it differs by a per-row constant, which softmax ignores but a finite fill or a
    sink's log-sum-exp would not (``score_chain.settle_alibi``)."""

    bias: fx.Node
    factor: Optional[fx.Node]  # None: the same slope for every head
    scale: float
    exact: bool
    absolute: bool = False  # ``scale · |j − i|``: a slope only once the band fixes the sign of j − i


@dataclass
class Site:
    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: Operand = None
    k: Operand = None
    v: Operand = None
    out_permute: Optional[list[int]] = None
    scale: list[tuple[Scalar, int]] = field(default_factory=list)  # (factor, +1 mul / -1 div)
    scale_tensors: list[tuple[fx.Node, int]] = field(default_factory=list)  # one-element tensors, applied to q
    softcap: float = 0.0
    biases: list[fx.Node] = field(default_factory=list)
    masks: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (bool node, True=hidden where True)
    fill: Optional[float] = None
    fill_added: Optional[bool] = None  # every hiding mask was added to the scores (False: one replaces them)
    band_lo: Optional[Offset] = None
    band_hi: Optional[Offset] = None
    batch_view: Optional[fx.Node] = None  # a chain view that fixes the canonical batch dims
    lifted: int = 0
    mutated: frozenset = frozenset()  # nodes written in place somewhere: never read around them
    relayout: set = field(default_factory=set)  # biases to reshape to the op's batch layout
    metadata_reads: list[fx.Node] = field(default_factory=list)  # size/dtype reads of scores or probs
    sink: Optional[fx.Node] = None  # per-head sink logits (gpt-oss), broadcastable to [*batch, 1, 1]
    alibi: list[AlibiTerm] = field(default_factory=list)  # biases passed as slopes
    zero_empty_rows: bool = False  # ``_safe_softmax`` (an SDPA call): rows with no visible key give 0
