"""The CPU flash backward: ATen's CPU flash backward over the forward's own tiling.

With the forward's output ``O`` and log-sum-exp ``L`` saved, a query row's probabilities are
``P = exp(S - L)`` over *all* its keys, so the gradient splits over key runs exactly: each run
``[k0, k1)`` handed to ``_scaled_dot_product_flash_attention_for_cpu_backward`` with the global
``O`` and ``L`` (which give ``D = rowsum(dO ⊙ O)``) returns that run's share of dQ and its dK,
dV. The runs are the forward's: empty tiles (by the band, the segment ids or a dense mask read at
run time) skipped, partial tiles masked from indices, ALiBi and biases as each tile's additive
mask; a problem the forward served in one ATen call is differentiated in one call. GQA gradients
are summed per K/V head by ATen's kernel, without repeated K/V.

Rows the forward could not serve with ATen (``exactness.unserved_rows``, and NaN rows) are left
out of ATen's calls — their ``dO`` and ``O`` zeroed, their ``L`` huge so that ``P = 0`` — and
differentiated by the reference's chain rule written out (``backward.row_gradients``: this runs
inside a custom op, where autograd does not); the autograd reference backward stays the oracle.
So are whole calls ATen cannot compute (softcap, float64, a value head dim unlike the query's)
and gradients of the bias or the ALiBi slopes.
"""

from __future__ import annotations

from typing import Optional

import torch

from fa_dynamo.kernels.backward import row_gradients
from fa_dynamo.kernels.backward_op import register_backward_op
from fa_dynamo.kernels.cpu import Problem, aten_serves, key_additive, whole_call
from fa_dynamo.kernels.exactness import rows_with_nan, unserved_rows
from fa_dynamo.kernels.params import AttentionParams

_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

_LEFT_OUT_LSE = 1e30
"""The lse given to ATen for a row left out of its calls: every ``exp(s - lse)`` is 0."""


def attention_cpu_backward(grad_out, q, k, v, bias, mask, params: AttentionParams, out, lse, *,
                           needs_bias_grad: bool, needs_slopes_grad: bool = False) -> Optional[tuple]:
    """``(dq, dk, dv, None, None)`` as ``attention_backward`` computes them, or None where this
    backward does not serve the call (the caller runs the reference backward). Traceable: the
    run-time decisions happen inside ``fa_dynamo::attention_cpu_backward``."""
    if needs_bias_grad or (needs_slopes_grad and params.alibi is not None) or not aten_serves(q, v, params.softcap):
        return None
    dq, dk, dv = torch.ops.fa_dynamo.attention_cpu_backward(grad_out, q, k, v, bias, mask, out, lse,
                                                            **params.op_arguments())
    return dq, dk, dv, None, None


def _flash_backward(grad_out, q, k, v, bias, mask, out, lse, params: AttentionParams):
    """``(dq, dk, dv)`` in the inputs' dtypes (see the module doc)."""
    num_k = k.shape[2]
    if min(q.shape[0], q.shape[1], q.shape[2], num_k) == 0:  # no score: every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, grad_full = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    # a row left out for one batch entry or head is left out for all: its dK, dV shares then come
    # from the reference alone, never from both
    left_out = (unserved_rows(lse, mask, params, num_k) | rows_with_nan(out)).any(dim=0).any(dim=0)  # [Sq]
    has_left_out = bool(left_out.any())
    grad_out, lse = grad_full, lse.float()  # ATen's backward reads the lse in float32, as its forward returns it
    if has_left_out:
        grad_out = grad_full.masked_fill(left_out.unsqueeze(-1), 0)
        out = out.masked_fill(left_out.unsqueeze(-1), 0)
        lse = lse.masked_fill(left_out, _LEFT_OUT_LSE)

    causal = whole_call(q, k, v, bias, mask, params)
    if causal is not None:
        dq, dk, dv = _flash_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal,
                                         attn_mask=key_additive(bias, mask, q.dtype), scale=params.scale)
        dq, dk, dv = dq.float(), dk.float(), dv.float()
    else:
        dq, dk, dv = _tiled(grad_out, q, k, v, bias, mask, params, out, lse)
    if has_left_out:
        rows = left_out.nonzero().flatten()
        r_dq, r_dk, r_dv = row_gradients(grad_full, q, k, v, bias, mask, params, rows)
        dq.index_copy_(2, rows, r_dq.index_select(2, rows).float())
        dk += r_dk.float()
        dv += r_dv.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _tiled(grad_out, q, k, v, bias, mask, params: AttentionParams, out, lse):
    """dQ, dK, dV in float32, summed over the forward's key runs of each query tile."""
    problem = Problem(q, k, v, bias, mask, params)
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for q0 in range(0, q.shape[2], params.block_q):
        q1 = min(q0 + params.block_q, q.shape[2])
        rows = slice(q0, q1)
        for k0, k1, band_partial, segments_partial in problem.runs(q0, q1):
            tile = problem.additive_tile(q0, q1, k0, k1, band_partial, segments_partial)
            t_dq, t_dk, t_dv = _flash_cpu_backward(
                grad_out[:, :, rows], q[:, :, rows], k[:, :, k0:k1], v[:, :, k0:k1], out[:, :, rows],
                lse[:, :, rows], 0.0, False, attn_mask=tile, scale=params.scale)
            dq[:, :, rows] += t_dq
            dk[:, :, k0:k1] += t_dk
            dv[:, :, k0:k1] += t_dv
    return dq, dk, dv


register_backward_op("attention_cpu_backward", _flash_backward)
