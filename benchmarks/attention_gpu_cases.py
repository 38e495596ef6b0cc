"""The GPU suite's cases: shapes (FlashAttention's benchmark: B·S and H·d held constant) and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

PASSES = ("fwd", "fwd_bwd")
BACKWARD_FLOP_FACTOR = 2.5  # backward = 2.5 forwards (FlashAttention's convention)


@dataclass(frozen=True)
class Case:
    seq_len: int
    head_dim: int
    causal: bool
    pass_name: str  # "fwd" | "fwd_bwd"
    batch: int
    heads: int
    kv_heads: int

    @property
    def config(self) -> str:
        """The case without its length: the unit of the correctness check."""
        return f"d{self.head_dim}-{'causal' if self.causal else 'full'}-{self.pass_name}"

    @property
    def key(self) -> str:
        return f"S{self.seq_len}-{self.config}"

    @property
    def backward(self) -> bool:
        return self.pass_name == "fwd_bwd"

    @property
    def flop(self) -> float:
        """4·B·H·S²·d, ½ causal, × (1 + 2.5) with the backward."""
        fwd = 4.0 * self.batch * self.heads * self.seq_len**2 * self.head_dim / (2 if self.causal else 1)
        return fwd * (1 + BACKWARD_FLOP_FACTOR) if self.backward else fwd


def matrix(lengths, head_dims, masks, passes, tokens: int, model_dim: int, gqa: int) -> list[Case]:
    """Every case, the lengths innermost and ascending (each configuration's check comes first)."""
    cases = []
    for d in head_dims:
        if model_dim % d:
            raise ValueError(f"--model-dim {model_dim} is not a multiple of head dim {d}")
        heads = model_dim // d
        if gqa < 1 or heads % gqa:
            raise ValueError(f"--gqa {gqa} must divide the {heads} heads of head dim {d} (model dim {model_dim})")
        for mask in masks:
            for pass_name in passes:
                for s in sorted(lengths):
                    cases.append(Case(s, d, mask == "causal", pass_name, max(1, tokens // s), heads, heads // gqa))
    return cases

