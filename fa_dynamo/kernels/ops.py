"""``fa_dynamo::attention``: the custom op the attention pass rewrites to.

Layers, top to bottom: the public ``attention`` function (documented shapes, input checks),
the ``torch.library`` custom op with its fake implementation right below it, its autograd,
and ``_run_kernel``, the one place that dispatches by kernel choice and device.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from fa_dynamo.logs import warn_once
from fa_dynamo.config import KERNELS
from fa_dynamo.kernels.alibi import Alibi
from fa_dynamo.kernels.backward import attention_backward
from fa_dynamo.kernels.cpu import attention_cpu, attention_sdpa
from fa_dynamo.kernels.cpu_backward import attention_cpu_backward
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import reference_attention
from fa_dynamo.kernels.segments import Segments

log = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    softcap: float = 0.0, fill: float = float("-inf"), min_offset: Optional[int] = None,
    max_offset: Optional[int] = None, kernel: str = "auto", block_q: int = 256, block_k: int = 512,
    q_segments: Optional[torch.Tensor] = None, k_segments: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None, zero_empty_rows: bool = False, fill_added: bool = False,
) -> torch.Tensor:
    """Attention as eager PyTorch computes it, without the Sq×Sk intermediates.

    Args:
        q: ``[B, Hq, Sq, D]`` queries.
        k: ``[B, Hkv, Sk, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (GQA: query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``, as ``repeat_kv`` would).
        v: ``[B, Hkv, Sk, Dv]`` values.
        bias: additive float scores, broadcastable to ``[B, Hq, Sq, Sk]`` (masks with ``-inf``
            or ``finfo.min``, ALiBi, relative position bias).
        mask: bool, broadcastable to ``[B, Hq, Sq, Sk]``; True replaces the score by ``fill``.
        scale: multiplies ``q·kᵀ``; default ``D ** -0.5``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` before the bias.
        fill: the value masked scores are replaced with (``-inf`` or e.g. ``finfo.min``).
        min_offset, max_offset: the band mask: key ``j`` is visible to query ``i`` iff
            ``min_offset <= j - i <= max_offset``; None leaves that side open.
        kernel: one of ``auto, cpu, triton, npu, sdpa, reference``.
        block_q, block_k: outer (query) and inner (key) tile sizes.
        q_segments, k_segments: integer sequence ids ``[B, Sq]`` and ``[B, Sk]`` (both or
            neither): key ``j`` is visible to query ``i`` of batch ``b`` only if
            ``q_segments[b, i] == k_segments[b, j]`` (packed sequences, chunked attention).
            Ids that never decrease along the sequence let kernels skip whole tiles.
        alibi_slopes: ALiBi slopes ``[Hq]`` or ``[B, Hq]`` (FlashAttention's shapes; any dim may
            be 1): ``slopes[b, h] · (j − i)`` is added with the bias, computed per tile, never
            held as an Sq×Sk tensor. A model's ``slope · j`` or causal ``−slope · |i − j|`` is
            the same attention (softmax ignores a per-row constant).
        zero_empty_rows: a row whose scores are all ``-inf`` gives 0 (and passes no gradient),
            as ``F.scaled_dot_product_attention`` does (its ``_safe_softmax``), instead of NaN,
            as ``softmax`` does.
        fill_added: hidden scores are ``s + fill`` (eager's additive ``finfo.min`` or ``-inf``
            mask), not ``fill``: the same values for a fill that absorbs any score, but the
            gradient flows through them (a row that sees no key passes gradient to q and k, as
            eager's does) and a NaN score stays NaN.

    Returns:
        ``[B, Hq, Sq, Dv]`` in ``q``'s dtype. A row whose scores are all ``-inf`` is NaN, as in
        eager PyTorch's softmax (0 with ``zero_empty_rows``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None if bias is None else _as_4d(bias, "bias")
    mask = None if mask is None else _as_4d(mask, "mask")
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.unsqueeze(0)
    out, _ = torch.ops.fa_dynamo.attention(
        q, k, v, bias=bias, mask=mask, scale=scale, softcap=softcap, fill=fill, min_offset=min_offset,
        max_offset=max_offset, kernel=kernel, block_q=block_q, block_k=block_k, q_segments=q_segments,
        k_segments=k_segments, alibi_slopes=alibi_slopes, zero_empty_rows=zero_empty_rows,
        fill_added=fill_added,
    )
    return out


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims (broadcastable to [B, H, Sq, Sk]), got {tuple(t.shape)}")
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def check_inputs(q, k, v, bias, mask, kernel: str, block_q: int, block_k: int,
                 q_segments=None, k_segments=None, alibi_slopes=None) -> None:
    """Raise a ValueError describing the first problem with the op's inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and sequence length")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for name, t in (("bias", bias), ("mask", mask)):
        if t is None:
            continue
        if t.dim() != 4 or any(s not in (1, f) for s, f in zip(t.shape, full)):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to [B, Hq, Sq, Sk] = {list(full)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if bias is not None and not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be floating point, got {bias.dtype}; pass boolean masks as mask=")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be torch.bool (True = masked), got {mask.dtype}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not valid; expected one of {', '.join(KERNELS)}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1, got {block_q}, {block_k}")
    _check_segments(q, k, q_segments, k_segments)
    _check_alibi(q, alibi_slopes)


def _check_segments(q, k, q_segments, k_segments) -> None:
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments and k_segments go together: pass both ([B, Sq] and [B, Sk]) or neither")
    if q_segments is None:
        return
    for name, t, length in (("q_segments", q_segments, q.shape[2]), ("k_segments", k_segments, k.shape[2])):
        if t.dim() != 2 or t.shape[0] != q.shape[0] or t.shape[1] != length:
            raise ValueError(f"{name} must have shape [B, {'Sq' if name[0] == 'q' else 'Sk'}] = "
                             f"[{q.shape[0]}, {length}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer sequence ids, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_alibi(q, slopes) -> None:
    if slopes is None:
        return
    want = (q.shape[0], q.shape[1])
    if slopes.dim() != 2 or any(s not in (1, w) for s, w in zip(slopes.shape, want)):
        raise ValueError(f"alibi_slopes must be [Hq] or [B, Hq] (broadcastable to {list(want)}), "
                         f"got shape {tuple(slopes.shape)}")
    if not slopes.dtype.is_floating_point:
        raise ValueError(f"alibi_slopes must be floating point, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {q.device}")


@torch.library.custom_op("fa_dynamo::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    scale: float, softcap: float, fill: float, min_offset: Optional[int], max_offset: Optional[int], kernel: str,
    block_q: int, block_k: int, q_segments: Optional[torch.Tensor] = None,
    k_segments: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
    zero_empty_rows: bool = False, fill_added: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(q, k, v, bias, mask, kernel, block_q, block_k, q_segments, k_segments, alibi_slopes)
    params = AttentionParams.of(scale, softcap, fill, min_offset, max_offset, block_q, block_k, q_segments,
                                k_segments, alibi_slopes, zero_empty_rows, fill_added)
    out, lse = _run_kernel(kernel, q, k, v, bias, mask, params)
    if zero_empty_rows:  # kernels give NaN and lse = -inf for a row that sees no key; SDPA gives 0
        # (a finite row can have lse = -inf too: float64 scores at finfo.min overflow logsumexp)
        empty = torch.isneginf(lse) & out.isnan().any(-1)
        out = out.masked_fill(empty.unsqueeze(-1), 0)
    return out.contiguous(), lse.contiguous()  # the layout the fake implementation promises


@_attention_op.register_fake
def _(q, k, v, bias, mask, scale, softcap, fill, min_offset, max_offset, kernel, block_q, block_k,
      q_segments=None, k_segments=None, alibi_slopes=None, zero_empty_rows=False, fill_added=False):
    check_inputs(q, k, v, bias, mask, kernel, block_q, block_k, q_segments, k_segments, alibi_slopes)
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    return out, lse


# The op's argument names in schema order: autograd's inputs and gradients are positional.
_INPUTS = tuple(a.name for a in torch.ops.fa_dynamo.attention.default._schema.arguments)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    tensors = ("q", "k", "v", "bias", "mask", "q_segments", "k_segments", "alibi_slopes")
    ctx.save_for_backward(*(args[n] for n in tensors), *output)  # out, lse: for the FA2 backward
    # the tensor-free rest; the segment ids and slopes come back from the saved tensors
    ctx.params = AttentionParams.of(**{n: args[n] for n in _INPUTS if n not in tensors and n != "kernel"})
    ctx.kernel = args["kernel"]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, bias, mask, q_segments, k_segments, alibi_slopes, out, lse = ctx.saved_tensors
    params = ctx.params.replace(segments=Segments.of(q_segments, k_segments), alibi=Alibi.of(alibi_slopes))
    wants = dict(zip(_INPUTS, ctx.needs_input_grad))
    grads_of = dict(needs_bias_grad=bias is not None and wants["bias"],
                    needs_slopes_grad=alibi_slopes is not None and wants["alibi_slopes"])
    triton_backward = _triton_entry("attention_triton_backward") if _wants_triton(ctx.kernel, q) else None
    if triton_backward is not None:
        dq, dk, dv, dbias, dslopes = triton_backward(grad_out, q, k, v, bias, mask, params, out=out, lse=lse,
                                                     **grads_of)
    else:
        flash = None
        if q.device.type == "cpu" and ctx.kernel in ("auto", "cpu", "sdpa"):
            flash = attention_cpu_backward(grad_out, q, k, v, bias, mask, params, out, lse, **grads_of)
        dq, dk, dv, dbias, dslopes = flash or attention_backward(grad_out, q, k, v, bias, mask, params, **grads_of)
    grads = dict(q=dq, k=dk, v=dv, bias=dbias, alibi_slopes=dslopes)  # the rest have no gradient
    return tuple(grads.get(name) for name in _INPUTS)


_attention_op.register_autograd(_backward, setup_context=_setup_context)



def _wants_triton(kernel: str, q) -> bool:
    return kernel == "triton" or (kernel == "auto" and q.device.type == "cuda")


def _triton_entry(name: str):
    """``attention_triton`` or ``attention_triton_backward``; None (said once) without triton."""
    try:
        from fa_dynamo.kernels.triton import backward as triton_backward, forward as triton_attention
    except ImportError as e:
        warn_once(log, f"the triton kernel needs triton ({e}); using another kernel instead")
        return None
    return getattr(triton_backward if name == "attention_triton_backward" else triton_attention, name)


def _run_kernel(kernel: str, q, k, v, bias, mask, params: AttentionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by kernel choice and device; a kernel that cannot serve the call says so once."""
    on_cpu = q.device.type == "cpu"
    if _wants_triton(kernel, q):
        attention_triton = _triton_entry("attention_triton")
        if attention_triton is not None:  # it falls back itself (logged) on what it cannot serve
            return attention_triton(q, k, v, bias, mask, params)
        kernel = "auto"
    if kernel == "xformers":
        if q.device.type == "cuda":
            from fa_dynamo.kernels.vendor.xformers import attention_xformers

            result = attention_xformers(q, k, v, bias, mask, params)  # None: not served (said once)
            if result is not None:
                return result
        else:
            warn_once(log, "the xformers kernel serves CUDA tensors only; using another kernel instead")
        kernel = "auto"
    if kernel == "npu" or (kernel == "auto" and q.device.type == "npu"):
        if q.device.type == "npu":
            from fa_dynamo.kernels.vendor.npu import attention_npu

            return attention_npu(q, k, v, bias, mask, params)  # falls back itself without torch_npu
        fallback = "cpu" if on_cpu else "reference"
        warn_once(log, f"the npu kernel serves npu tensors; using the {fallback} kernel instead")
        kernel = "auto"
    if kernel == "auto":
        if not on_cpu:
            warn_once(log, f"no tiled kernel for {q.device.type} tensors yet; using the reference kernel")
        kernel = "cpu" if on_cpu else "reference"
    if kernel in ("cpu", "sdpa") and not on_cpu:
        warn_once(log, f"the {kernel} kernel serves CPU tensors only; using the reference kernel on {q.device.type}")
        kernel = "reference"
    if kernel == "reference":
        return reference_attention(q, k, v, bias, mask, params)
    if kernel == "sdpa":
        return attention_sdpa(q, k, v, bias, mask, params)
    return attention_cpu(q, k, v, bias, mask, params)
