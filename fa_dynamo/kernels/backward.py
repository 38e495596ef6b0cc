"""Backward of ``fa_dynamo::attention``: the reference math re-run tile by tile under autograd.

Softmax rows are independent, so recomputing ``block_q`` query rows at a time and letting
autograd differentiate the reference gives exactly eager's gradients (NaN where eager has NaN)
with memory O(block_q × Sk) instead of O(Sq × Sk).

``row_gradients`` is the same chain rule written out, for code that runs where autograd does
not (inside a custom op): the fused CPU backward's rows that only the reference serves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fa_dynamo.kernels.alibi import Alibi
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import (compute_dtype, group_heads, hidden_scores, masked_scores, reference_attention,
                                         rows_of)


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
    params: AttentionParams,
    *,
    needs_bias_grad: bool, needs_slopes_grad: bool = False, rows: Optional[torch.Tensor] = None,
) -> tuple:
    """``(dq, dk, dv, dbias, dslopes)``; ``dbias`` has ``bias``'s shape and ``dslopes`` the ALiBi
    slopes', each None when not needed. With ``rows`` (query row indices), only those rows'
    gradients: dq is zero elsewhere, and dk, dv, dbias, dslopes hold their contributions."""
    num_q, block_q, alibi = q.shape[2], params.block_q, params.alibi
    dq = torch.empty_like(q) if rows is None else torch.zeros_like(q)
    dk = torch.zeros_like(k, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype)
    dv = torch.zeros_like(v, dtype=dk.dtype)
    dbias = torch.zeros_like(bias, dtype=dk.dtype) if needs_bias_grad else None
    needs_slopes_grad = needs_slopes_grad and alibi is not None
    dslopes = torch.zeros_like(alibi.slopes, dtype=dk.dtype) if needs_slopes_grad else None
    k_leaf, v_leaf = k.detach().requires_grad_(), v.detach().requires_grad_()
    if rows is None:
        rows = torch.arange(num_q, device=q.device)
    for start in range(0, rows.numel(), block_q):
        idx = rows[start : start + block_q]
        q_t = q.index_select(2, idx).detach().requires_grad_()
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
            grads = torch.autograd.grad(out_t, inputs, grad_out.index_select(2, idx))
        dq.index_copy_(2, idx, grads[0])
        dk += grads[1]
        dv += grads[2]
        if needs_bias_grad:
            if bias.shape[-2] == 1:
                dbias += grads[3]
            else:
                dbias.index_copy_(-2, idx, grads[3])
        if needs_slopes_grad:
            dslopes += grads[-1]
    return (dq, dk.to(k.dtype), dv.to(v.dtype), None if dbias is None else dbias.to(bias.dtype),
            None if dslopes is None else dslopes.to(alibi.slopes.dtype))


def row_gradients(grad_out, q, k, v, bias, mask, params: AttentionParams, rows: torch.Tensor):
    """``(dq, dk, dv)`` in the compute dtype: rows ``rows``' dq (zero elsewhere) and their shares of
    dk, dv, by the chain rule of ``reference_attention`` in its own order — matmul, scale, softcap,
    bias and ALiBi added, hidden scores replaced (no gradient through them unless ``fill_added``),
    softmax, matmul — so NaN lands where autograd puts it (e.g. ``dv`` of a row whose scores are
    all ``-inf``; 0 there with ``zero_empty_rows``, as ``_safe_softmax``'s backward gives). For
    the fused backwards' rows the forward served through the reference: autograd does not record
    inside a custom op, so the chain is written out."""
    kv_heads, ct, device = k.shape[1], compute_dtype(q.dtype), q.device
    k_g, v_g = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    dq = torch.zeros(q.shape, dtype=ct, device=device)
    dk = torch.zeros(k.shape, dtype=ct, device=device)
    dv = torch.zeros(v.shape, dtype=ct, device=device)
    k_idx = torch.arange(k.shape[2], device=device)
    for start in range(0, rows.numel(), params.block_q):
        idx = rows[start : start + params.block_q]
        row_params, row_mask = params.rows(idx), rows_of(mask, idx)
        s = masked_scores(q.index_select(2, idx), k, idx, rows_of(bias, idx), row_mask, row_params)
        p = torch.ops.aten._safe_softmax(s, -1) if params.zero_empty_rows else torch.softmax(s, dim=-1)
        do = group_heads(grad_out.index_select(2, idx).to(ct), kv_heads)  # [B, Hkv, G, r, Dv]
        dv += (p.transpose(-1, -2) @ do).sum(2)
        dp = do @ v_g.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        hidden = hidden_scores(idx, k_idx, row_mask, row_params, kv_heads)
        if hidden is not None and not params.fill_added:
            ds = ds.masked_fill(hidden, 0)
        q_g = group_heads(q.index_select(2, idx).to(ct), kv_heads)
        if params.softcap > 0:
            t = torch.tanh((q_g @ k_g.transpose(-1, -2)) * params.scale / params.softcap)
            ds = ds * (1.0 - t * t)
        ds = ds * params.scale
        dq.index_copy_(2, idx, (ds @ k_g).flatten(1, 2))
        dk += (ds.transpose(-1, -2) @ q_g).sum(2)
    return dq, dk, dv
