"""The custom op a fused backward runs in: ``(grad_out, q, k, v, bias, mask, out, lse, <the op's
non-tensor arguments>) -> (dq, dk, dv)``.

aot_autograd traces the forward op's backward formula with fake tensors, so a backward that
decides at run time — which rows the reference serves, which tiles to skip — must run inside an
op of its own, opaque to the trace. Each fused backward (CPU flash, Triton) registers one here
under its own name, with this one schema.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fa_dynamo.kernels.params import AttentionParams

BackwardKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``kernel(grad_out, q, k, v, bias, mask, out, lse, params) -> (dq, dk, dv)`` in the inputs' dtypes."""


def register_backward_op(name: str, kernel: BackwardKernel):
    """``fa_dynamo::<name>`` running ``kernel``; call it with ``params.op_arguments()`` as keywords."""

    def op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
        mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float, softcap: float,
        fill: float, min_offset: Optional[int], max_offset: Optional[int], block_q: int, block_k: int,
        q_segments: Optional[torch.Tensor] = None, k_segments: Optional[torch.Tensor] = None,
        alibi_slopes: Optional[torch.Tensor] = None, zero_empty_rows: bool = False, fill_added: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params = AttentionParams.of(scale, softcap, fill, min_offset, max_offset, block_q, block_k, q_segments,
                                    k_segments, alibi_slopes, zero_empty_rows, fill_added)
        grads = kernel(grad_out, q, k, v, bias, mask, out, lse, params)
        return tuple(_in_layout_of(x, g) for x, g in zip((q, k, v), grads))

    custom = torch.library.custom_op(f"fa_dynamo::{name}", op, mutates_args=())

    @custom.register_fake
    def _(grad_out, q, k, v, *args, **kwargs):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return custom


def _in_layout_of(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides ``torch.empty_like(x)`` has, as the fake implementation promises
    (Inductor checks them: a transposed q, from a ``[B, S, H, D]`` projection, gets a transposed dq)."""
    like = torch.empty_like(x)
    return grad if like.stride() == grad.stride() else like.copy_(grad)
