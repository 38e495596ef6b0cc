"""Ascend NPU dispatch: ``fa_dynamo::attention`` on torch_npu's fused attention kernels.

Two kernels, both called in the BNSD layout (our ``[B, H, S, D]``) with GQA handled natively
(``key``/``value`` keep their ``Hkv`` heads):

* ``torch_npu.npu_fusion_attention`` (the training kernel; float16/bfloat16/float32, dense bias
  through ``pse``), used whenever an input requires grad, and for what the inference kernel
  does not take (float32, a bias, per-head masks, head dims not a multiple of 16);
* ``torch_npu.npu_fused_infer_attention_score`` (inference; float16/bfloat16), otherwise.

The band (the mask description) becomes a ``sparse_mode``, so no ``Sq × Sk`` mask is built:

=========================  ============================================================  ======
band ``lo <= j - i <= hi``  torch_npu                                                     mask
=========================  ============================================================  ======
unbounded                  ``sparse_mode=0``, no mask                                     none
``hi = 0``                 ``sparse_mode=2`` (causal, top-left)                          2048²
``hi = Sk - Sq``           ``sparse_mode=3`` (causal, bottom-right)                      2048²
any other band             ``sparse_mode=4``, ``pre = (Sk-Sq) - lo``, ``next = hi - (Sk-Sq)``  2048²
with a dense mask, or a    ``sparse_mode=0``, band folded into the dense mask             dense
band outside mode 4's
documented limits
=========================  ============================================================  ======

(the 2048² mask is torch_npu's compressed causal mask, ``triu(ones(2048, 2048), 1)``, built once
per device). ``npu_fusion_attention`` adds ``pse`` *before* scaling (``scale·(pse + q·kᵀ)``), so
the bias goes in as ``bias / scale``. The log-sum-exp comes from ``softmax_max + log(softmax_sum)``
(training kernel) or ``softmax_lse`` (inference kernel). Rows with no visible key and rows where a
finite fill value matters are recomputed by the reference, as in the other kernels. Softcapping,
float64 and ``Dv > D`` are not served by torch_npu: they fall back, said once in the log.

Unverified on hardware: this mapping is tested only against a fake ``torch_npu`` that checks
every argument against the documented signatures and computes the documented semantics.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fa_dynamo.logs import warn_once
from fa_dynamo.kernels.alibi import alibi_as_bias
from fa_dynamo.kernels.cpu import attention_cpu
from fa_dynamo.kernels.exactness import recompute_unserved_rows
from fa_dynamo.kernels.mask import Band
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import reference_attention
from fa_dynamo.kernels.segments import segments_as_mask

log = logging.getLogger(__name__)

INT_MAX = 2147483647  # torch_npu's "no limit" for pre/next tokens
COMPRESSED_MASK = 2048  # side of torch_npu's compressed causal mask (sparse modes 2, 3, 4)
MAX_HEAD_DIM_TRAIN = 768  # npu_fusion_attention: D in 1..768, Dv <= D
MAX_HEAD_DIM_INFER = 512  # npu_fused_infer_attention_score: D <= 512, a multiple of 16
MAX_HEADS = 256
MAX_GQA_INFER = 64  # num_heads / num_key_value_heads


@dataclass(frozen=True)
class SparsePlan:
    """How a band reaches torch_npu."""

    sparse_mode: int  # 0 default (dense mask or none), 2/3 causal top-left/bottom-right, 4 band
    pre_tokens: int = INT_MAX
    next_tokens: int = INT_MAX
    fold_band: bool = False  # the band is folded into a dense mask (sparse_mode 0)

    @property
    def compressed(self) -> bool:
        return self.sparse_mode in (2, 3, 4)


def sparse_plan(band: Band, num_q: int, num_k: int, has_dense_mask: bool) -> SparsePlan:
    """The ``sparse_mode`` (and pre/next tokens) for a band; see the module table."""
    if band.is_unbounded:
        return SparsePlan(0)
    if has_dense_mask or num_q == 1:  # a dense mask is needed anyway; Q_S = 1 ignores sparse_mode
        return SparsePlan(0, fold_band=True)
    lo, hi = band.min_offset, band.max_offset
    if lo is None and hi == 0:
        return SparsePlan(2)
    if lo is None and hi == num_k - num_q:
        return SparsePlan(3)
    shift = num_k - num_q  # mode 4 counts from the bottom-right corner
    pre = INT_MAX if lo is None else shift - lo
    nxt = INT_MAX if hi is None else hi - shift
    if _band_within_limits(pre, nxt, num_q, num_k):
        return SparsePlan(4, pre, nxt)
    return SparsePlan(0, fold_band=True)


def _band_within_limits(pre: int, nxt: int, num_q: int, num_k: int) -> bool:
    """torch_npu's documented limits on pre/next tokens: they must overlap, and a negative one
    must be covered by the other and stay inside the sequence."""
    if pre + nxt < 0:
        return False
    if nxt < 0 and not (pre >= -nxt and -nxt < num_k):
        return False
    if pre < 0 and not (nxt >= -pre and -pre < num_q):
        return False
    return True


@functools.lru_cache(maxsize=None)
def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """torch_npu's compressed mask for sparse modes 2/3/4: True (masked) above the diagonal."""
    return torch.triu(torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=device), diagonal=1)


def _torch_npu():
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None




def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float) -> Optional[str]:
    """Why torch_npu cannot serve the call, or None."""
    if _torch_npu() is None:
        return "torch_npu is not importable"
    if softcap > 0:
        return "torch_npu's fused attention has no softcap"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"torch_npu's fused attention does not compute {q.dtype}"
    if v.shape[-1] > q.shape[-1] or q.shape[-1] > MAX_HEAD_DIM_TRAIN:
        return f"torch_npu needs Dv <= D <= {MAX_HEAD_DIM_TRAIN}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if q.shape[1] > MAX_HEADS:
        return f"torch_npu supports at most {MAX_HEADS} query heads, got {q.shape[1]}"
    return None


def _dense_mask(mask: Optional[torch.Tensor], band: Band, plan: SparsePlan, q, k) -> Optional[torch.Tensor]:
    """The boolean mask torch_npu gets: ``[B or 1, H or 1, Sq, Sk]`` (True = masked), or the
    compressed causal mask, or None."""
    if plan.compressed:
        return compressed_causal_mask(q.device)
    num_q, num_k = q.shape[2], k.shape[2]
    dense = None
    if mask is not None:
        dense = mask.expand(mask.shape[0], mask.shape[1], num_q, num_k)
    if plan.fold_band:
        hidden = band.hidden(torch.arange(num_q, device=q.device), torch.arange(num_k, device=q.device))
        dense = hidden[None, None] if dense is None else dense | hidden
    return None if dense is None else dense.contiguous()


def _infer_serves(q, k, v, bias, dense_mask: Optional[torch.Tensor], plan: SparsePlan) -> bool:
    """npu_fused_infer_attention_score's documented limits (and our choice not to pass it a bias:
    its ``pse_shift`` placement relative to the scale is not documented)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or bias is not None:
        return False
    if q.shape[-1] != v.shape[-1] or q.shape[-1] % 16 or q.shape[-1] > MAX_HEAD_DIM_INFER:
        return False
    if q.shape[1] // k.shape[1] > MAX_GQA_INFER:
        return False
    if dense_mask is not None and not plan.compressed and dense_mask.shape[1] != 1:
        return False  # its masks are [B or 1, 1, Sq, Sk]: no per-head masks
    return True


def _run_infer(npu, q, k, v, dense_mask, plan: SparsePlan, scale: float):
    batch, heads, num_q, _ = q.shape
    if dense_mask is not None and num_q == 1:  # decode: masks are (B, 1, 1, KV_S)
        dense_mask = dense_mask.expand(batch, 1, 1, k.shape[2]).contiguous()
    out, lse = npu.npu_fused_infer_attention_score(
        q, k, v,
        atten_mask=dense_mask,
        num_heads=heads,
        scale=scale,
        pre_tokens=plan.pre_tokens,
        next_tokens=plan.next_tokens,
        input_layout="BNSD",
        num_key_value_heads=k.shape[1],
        sparse_mode=plan.sparse_mode,
        inner_precise=0,
        softmax_lse_flag=True,
    )
    return out, lse.reshape(batch, heads, num_q).float()


def _run_train(npu, q, k, v, pse, dense_mask, plan: SparsePlan, scale: float):
    batch, heads, num_q, _ = q.shape
    result = npu.npu_fusion_attention(
        q, k, v, heads, "BNSD",
        pse=pse,
        atten_mask=dense_mask,
        scale=scale,
        keep_prob=1.0,
        pre_tockens=plan.pre_tokens,
        next_tockens=plan.next_tokens,
        inner_precise=0,
        sparse_mode=plan.sparse_mode,
    )
    out, softmax_max, softmax_sum = result[0], result[1], result[2]
    row_max = softmax_max.reshape(batch, heads, num_q, -1)[..., 0].float()
    row_sum = softmax_sum.reshape(batch, heads, num_q, -1)[..., 0].float()
    return out, row_max + torch.log(row_sum)


def _dead_rows(band: Band, dense_mask: Optional[torch.Tensor], plan: SparsePlan, pse, q, k) -> torch.Tensor:
    """Bool broadcastable to ``[B, H, Sq]``: rows that see no key (torch_npu's output there is not
    eager's NaN / uniform average, so they are recomputed)."""
    dead = band.empty_rows(q.shape[2], k.shape[2], q.device)[None, None]
    hidden = None if dense_mask is None or plan.compressed else dense_mask
    if pse is not None:
        pse_hidden = torch.isneginf(pse)
        hidden = pse_hidden if hidden is None else hidden | pse_hidden
    if hidden is not None:
        dead = dead | hidden.all(dim=-1)
    return dead


def attention_npu(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], params: AttentionParams,
    *,
    training: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``attention_cpu``, on torch_npu (``q`` on an NPU: ``ops`` dispatches only
    ``npu`` tensors here). ``training`` picks the kernel; by default, whether an input requires grad.
    Segment ids reach torch_npu as part of the dense mask (``segments_as_mask``).
    """
    reason = unsupported_reason(q, k, v, params.softcap)
    if reason is not None:
        on_cpu = q.device.type == "cpu"
        warn_once(log, f"{reason}; using the {'cpu' if on_cpu else 'reference'} kernel instead")
        return (attention_cpu if on_cpu else reference_attention)(q, k, v, bias, mask, params)
    mask = segments_as_mask(mask, params.segments, "npu")
    bias = alibi_as_bias(bias, params.alibi, q.shape[2], k.shape[2], "npu")
    params = params.replace(segments=None, alibi=None)  # now in the dense mask and bias
    band, scale = params.band, params.scale
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        return reference_attention(q, k, v, bias, mask, params)
    npu = _torch_npu()
    if training is None:
        training = any(t is not None and t.requires_grad for t in (q, k, v, bias))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    num_q, num_k = q.shape[2], k.shape[2]
    plan = sparse_plan(band, num_q, num_k, mask is not None)
    dense_mask = _dense_mask(mask, band, plan, q, k)
    pse = None
    if bias is not None:  # npu_fusion_attention computes scale * (pse + q·kᵀ)
        pse = (bias.to(torch.float32) / scale).to(q.dtype)
        pse = pse.expand(bias.shape[0], q.shape[1], num_q, num_k).contiguous()
    if not training and _infer_serves(q, k, v, bias, dense_mask, plan):
        out, lse = _run_infer(npu, q, k, v, dense_mask, plan, scale)
    else:
        out, lse = _run_train(npu, q, k, v, pse, dense_mask, plan, scale)
    out = out.reshape(q.shape[0], q.shape[1], num_q, v.shape[-1]).to(q.dtype).contiguous()
    lse = lse.masked_fill(_dead_rows(band, dense_mask, plan, pse, q, k), float("-inf")).contiguous()
    recompute_unserved_rows(out, lse, q, k, v, bias, mask, params)
    return out, lse
