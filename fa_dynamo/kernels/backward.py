"""Backward of ``fa_dynamo::attention``: the reference math re-run tile by tile under autograd.

Softmax rows are independent, so recomputing ``block_q`` query rows at a time and letting
autograd differentiate the reference gives exactly eager's gradients (NaN where eager has NaN)
with memory O(block_q × Sk) instead of O(Sq × Sk).
"""

from __future__ import annotations

from typing import Optional

import torch

from fa_dynamo.kernels.alibi import Alibi
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import reference_attention, rows_of


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    params: AttentionParams,
    *,
    needs_bias_grad: bool,
    needs_slopes_grad: bool = False,
) -> tuple:
    """``(dq, dk, dv, dbias, dslopes)``; ``dbias`` has ``bias``'s shape and ``dslopes`` the ALiBi
    slopes', each None when not needed."""
    num_q, block_q, alibi = q.shape[2], params.block_q, params.alibi
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype)
    dv = torch.zeros_like(v, dtype=dk.dtype)
    dbias = torch.zeros_like(bias, dtype=dk.dtype) if needs_bias_grad else None
    needs_slopes_grad = needs_slopes_grad and alibi is not None
    dslopes = torch.zeros_like(alibi.slopes, dtype=dk.dtype) if needs_slopes_grad else None
    k_leaf, v_leaf = k.detach().requires_grad_(), v.detach().requires_grad_()
    for q0 in range(0, num_q, block_q):
        q1 = min(q0 + block_q, num_q)
        idx = torch.arange(q0, q1, device=q.device)
        q_t = q[:, :, q0:q1].detach().requires_grad_()
        bias_t = rows_of(bias, idx)
        if needs_bias_grad:
            bias_t = bias_t.detach().requires_grad_()
        params_t = params.rows(idx)
        if needs_slopes_grad:
            params_t = params_t.replace(alibi=Alibi(alibi.slopes.detach().requires_grad_()))
        with torch.enable_grad():
            out_t, _ = reference_attention(q_t, k_leaf, v_leaf, bias_t, rows_of(mask, idx), params_t, q_idx=idx)
            inputs = ((q_t, k_leaf, v_leaf) + ((bias_t,) if needs_bias_grad else ())
                      + ((params_t.alibi.slopes,) if needs_slopes_grad else ()))
            grads = torch.autograd.grad(out_t, inputs, grad_out[:, :, q0 : q1])
        dq[:, :, q0 : q1] = grads[0]
        dk += grads[1]
        dv += grads[2]
        if needs_bias_grad:
            if bias.shape[-2] == 1:
                dbias += grads[3]
            else:
                dbias[..., q0 : q1, :] = grads[3]
        if needs_slopes_grad:
            dslopes += grads[-1]
    return (dq, dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype),
            None if dslopes is None else dslopes.to(alibi.slopes.dtype))
