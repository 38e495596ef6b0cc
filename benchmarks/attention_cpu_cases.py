"""The op-level CPU suite's cases: what is measured (mask, length, dtype, heads) and its FLOPs.

``grid(kind)`` lists a grid's cases, each series (everything but the length) in increasing
length, so the budget can predict a call from the same method at the previous length.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

METHODS = ("eager", "sdpa", "sdpa_mask", "sdpa_math", "op", "compiled_fa", "inductor", "flex")
LABELS = {
    "eager": "eager (HF)",
    "sdpa": "SDPA is_causal",
    "sdpa_mask": "SDPA mask",
    "sdpa_math": "SDPA math",
    "op": "fa_dynamo op",
    "compiled_fa": "compile fastattention",
    "inductor": "compile inductor",
    "flex": "FlexAttention",
}
COMPILED = ("compiled_fa", "inductor", "flex")
DENSE = ("eager", "sdpa_mask", "sdpa_math", "inductor")  # compute all S² scores whatever the mask
MASKS = ("causal", "none", "padding", "window")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADLINE = dict(seq=4096, mask="causal", dtype="fp32", head_dim=64, kv_heads=8)


@dataclass(frozen=True)
class Case:
    seq: int
    mask: str = "causal"  # causal | none | padding | window
    dtype: str = "fp32"  # fp32 | bf16
    head_dim: int = 64
    kv_heads: int = 8
    heads: int = 8

    @property
    def batch(self) -> int:
        return 2 if self.mask == "padding" else 1

    @property
    def window(self) -> int:
        return min(1024, self.seq // 4) if self.mask == "window" else 0

    @property
    def valid_keys(self) -> int:
        """Keys of batch row 1 left unpadded (row 0 keeps all)."""
        return self.seq - self.seq // 4 if self.mask == "padding" else self.seq

    @property
    def series(self) -> tuple:
        """Everything but the length: cases of one series are predicted from each other."""
        return (self.mask, self.dtype, self.head_dim, self.heads, self.kv_heads)

    @property
    def name(self) -> str:
        heads = "mha" if self.kv_heads == self.heads else f"gqa{self.heads}x{self.kv_heads}"
        return f"{self.mask}-{self.seq}-{self.dtype}-d{self.head_dim}-{heads}"

    def visible_pairs(self) -> int:
        """Exact (query, key) pairs the mask leaves visible, summed over the batch."""
        s = self.seq

        def causal_upto(keys: int) -> int:  # causal, only the first `keys` keys visible
            return keys * (keys + 1) // 2 + (s - keys) * keys

        if self.mask == "none":
            return s * s
        if self.mask == "causal":
            return causal_upto(s)
        if self.mask == "window":
            w = self.window
            return w * (w + 1) // 2 + (s - w) * w
        return causal_upto(s) + causal_upto(self.valid_keys)

    @property
    def flops(self) -> float:
        """Useful FLOPs: two GEMMs, 2 per multiply-add, over the visible pairs only."""
        return 4.0 * self.heads * self.head_dim * self.visible_pairs()

    @property
    def dense_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.head_dim * self.seq * self.seq

    def work(self, method: str) -> float:
        """The FLOPs ``method`` really does: all S² scores for the dense ones."""
        return self.dense_flops if method in DENSE else self.flops

    def describe(self) -> str:
        mask = {
            "causal": "causal",
            "none": "no mask",
            "padding": f"causal + key padding ({self.seq - self.valid_keys} of {self.seq} keys in row 1)",
            "window": f"sliding window {self.window}",
        }[self.mask]
        heads = f"{self.heads} heads" if self.kv_heads == self.heads else f"GQA {self.heads} q / {self.kv_heads} kv heads"
        return f"{mask}, {self.seq} tokens, {heads} × {self.head_dim}, B={self.batch}, {self.dtype}"


def cross_product(lengths, head_dims=(64, 128), masks=MASKS, dtypes=tuple(DTYPES), kv_heads=(8, 2)) -> list[Case]:
    return [Case(s, m, dt, d, kv) for d, m, dt, kv, s in itertools.product(head_dims, masks, dtypes, kv_heads, lengths)]


def grid(kind: str) -> list[Case]:
    """The cases of a grid, each series in increasing length (the budget predicts from the last)."""
    if kind == "full":
        cases = cross_product((512, 1024, 2048, 4096, 8192, 16384))
    elif kind == "default":
        cases = cross_product((512, 1024)) + cross_product(
            (2048, 4096, 8192, 16384), head_dims=(64,), masks=("causal", "window"), dtypes=("fp32",)
        )
    elif kind == "quick":
        cases = cross_product((512,), head_dims=(64,)) + [Case(1024), Case(2048)]
    elif kind == "smoke":
        cases = [Case(256), Case(256, "padding", "bf16", 64, 2)]
    else:
        raise ValueError(f"unknown grid {kind!r}; expected full, default, quick or smoke")
    return sorted(set(cases), key=lambda c: (c.seq > 1024, c.series, c.seq))

