"""SDPA calls as attention sites: each call written out as the math it computes.

``F.scaled_dot_product_attention`` (``aten.scaled_dot_product_attention`` after
normalization, or ATen's CPU flash op called directly) gives its score chain as arguments
instead of nodes. ``expand_sdpa`` writes each call out beside it the way ATen's math kernel
defines it::

    k, v = repeat_interleave(k, v, Hq // Hkv, dim=-3)      if enable_gqa
    s = (q @ kᵀ) * scale                                    scale=None: 1/√E
    s = s + attn_mask                                       a float mask
    s = s.masked_fill(~attn_mask, -inf)                     a bool mask (True = attend)
    s = s.masked_fill(~ones(L, S).tril(), -inf)             is_causal (top-left; with a mask too,
                                                            where eager's CPU flash kernel serves it)
    p = _safe_softmax(s, -1)                                a row with no visible key gives 0
    p = dropout(p, dropout_p, train=True)                   dropout_p > 0
    out = p @ v

so the structural matcher reads it like hand-written attention: masks lifted
(``mask_lifting``), GQA copies undone, autocast dtypes, dynamic shapes. ``_safe_softmax`` tells
the rewrite to give 0 for rows with no visible key, as SDPA does on CPU (flash and math
kernels alike), where softmax gives NaN. A site the matcher refuses gets its SDPA call back
(``SdpaExpansion.restore``), so an unfused site runs exactly as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fa_dynamo.passes.matching import aten, insert_with_val, is_op, python_scalar, shape, val

_SDPA = (aten.scaled_dot_product_attention,)
_FLASH_CPU = (aten._scaled_dot_product_flash_attention_for_cpu,)  # -> (out, logsumexp)


@dataclass
class SdpaExpansion:
    """An SDPA call written out: its ``softmax`` is the site the matcher starts from."""

    call: fx.Node  # the SDPA node, kept (without users) until the site is fused or refused
    result: fx.Node  # the call, or the getitem of its output: what the users read before
    out: fx.Node  # what they read now: the written-out ``p @ v``
    softmax: fx.Node

    @property
    def kept(self) -> tuple[fx.Node, ...]:
        """Nodes dead-code elimination must keep while the site is undecided."""
        return (self.call, self.result)

    def erase(self) -> None:
        """Remove the call once its site is fused (dead-code elimination keeps it: SDPA's
        ``dropout_p`` makes it a random op)."""
        for node in (*(u for u in self.call.users if not u.users), self.call):  # unread getitems first
            node.graph.erase_node(node)

    def restore(self) -> None:
        """Give the call its users back; the written-out nodes become dead code."""
        self.out.replace_all_uses_with(self.result)


def is_sdpa(node: fx.Node) -> bool:
    return is_op(node, *_SDPA, *_FLASH_CPU)


@dataclass(frozen=True)
class _Arguments:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Optional[fx.Node]
    dropout_p: float
    is_causal: bool
    scale: Any  # None, a number or a symbolic scalar node
    enable_gqa: bool


def _arguments(node: fx.Node) -> _Arguments:
    """SDPA's arguments by name, whichever of the two schemas the node calls."""
    names = [a.name for a in node.target._schema.arguments]
    given = dict(zip(names, node.args), **node.kwargs)
    defaults = {a.name: a.default_value for a in node.target._schema.arguments if a.has_default_value()}
    get = lambda name: given.get(name, defaults.get(name))  # noqa: E731
    return _Arguments(get("query"), get("key"), get("value"), get("attn_mask"), get("dropout_p"),
                      get("is_causal"), get("scale"), bool(get("enable_gqa")))


def expand_sdpa(node: fx.Node) -> tuple[Optional[SdpaExpansion], str]:
    """Write ``node`` out before itself and point its users at the result; ``(None, why)`` when it
    is a call the written-out form would not compute exactly (it is then left as it is)."""
    result = node
    if is_op(node, *_FLASH_CPU):
        readers = [u for u in node.users if u.users]  # make_fx may leave an unread getitem of the lse
        if len(readers) != 1 or readers[0].target is not operator.getitem or readers[0].args[1] != 0:
            return None, "the log-sum-exp of _scaled_dot_product_flash_attention_for_cpu is read"
        result = readers[0]
    a = _arguments(node)
    q, k, v = (val(t) for t in (a.q, a.k, a.v))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or min(q.dim(), k.dim(), v.dim()) < 2:
        return None, "SDPA with operands of fewer than 2 dims"
    if python_scalar(a.dropout_p) is None or not isinstance(a.is_causal, bool):
        return None, f"SDPA with a non-constant dropout_p ({a.dropout_p}) or is_causal ({a.is_causal})"
    mask = val(a.mask)
    if mask is not None and not (mask.dtype == torch.bool or mask.dtype == q.dtype):
        return None, f"SDPA with a {mask.dtype} attn_mask for {q.dtype} queries (eager SDPA rejects it)"
    if a.is_causal and mask is not None and not _flash_cpu_serves(q, k, v, mask):
        return None, ("SDPA with both attn_mask and is_causal, which only ATen's CPU flash kernel accepts (it "
                      "applies both) and these inputs do not reach it: the call is left to SDPA")
    if a.enable_gqa and (q.dim() < 3 or k.shape[-3] == 0 or q.shape[-3] % k.shape[-3] != 0):
        return None, "SDPA with enable_gqa and query heads that are not a multiple of the key/value heads"

    def emit(target, *args, **kwargs) -> fx.Node:
        new = insert_with_val(node, target, args, kwargs)
        new.meta["stack_trace"] = node.meta.get("stack_trace")  # logs point at the user's SDPA line
        return new

    k_node, v_node = a.k, a.v
    if a.enable_gqa and q.shape[-3] != k.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        if not isinstance(groups, int):  # symbolic head counts (dynamic=True)
            groups = emit(operator.floordiv, _size(emit, a.q, -3), _size(emit, a.k, -3))
        k_node = emit(aten.repeat_interleave.self_int, k_node, groups, -3)
        v_node = emit(aten.repeat_interleave.self_int, v_node, groups, -3)
    s = emit(aten.matmul.default, a.q, emit(aten.transpose.int, k_node, -2, -1))
    scale = a.scale if a.scale is not None else _default_scale(emit, a.q, q)
    s = emit(aten.mul.Tensor, s, scale)
    if mask is not None and mask.dtype != torch.bool:
        float_mask = a.mask
        if (cast := _autocast_dtype(node, q.device.type)) is not None:  # SDPA casts its mask under autocast too
            float_mask = emit(aten._to_copy.default, float_mask, dtype=cast)
        s = emit(aten.add.Tensor, s, float_mask)
    if mask is not None and mask.dtype == torch.bool:
        s = emit(aten.masked_fill.Scalar, s, emit(aten.logical_not.default, a.mask), float("-inf"))
    if a.is_causal:
        num_q, num_k = (_size(emit, t, -2) for t in (a.q, k_node))
        causal = emit(aten.tril.default, emit(aten.ones.default, [num_q, num_k], dtype=torch.bool, device=q.device))
        s = emit(aten.masked_fill.Scalar, s, emit(aten.logical_not.default, causal), float("-inf"))
    p = emit(aten._safe_softmax.default, s, -1)
    if python_scalar(a.dropout_p) > 0:
        p = emit(aten.dropout.default, p, python_scalar(a.dropout_p), True)
    out = emit(aten.matmul.default, p, v_node)
    if tuple(shape(out)) != tuple(val(result).shape):
        return None, f"SDPA's written-out form has shape {tuple(shape(out))}, the call {tuple(val(result).shape)}"
    out = _in_layout_of(emit, out, val(result))
    if out is None:
        return None, f"SDPA's output has strides {val(result).stride()} that a permutation does not give"
    result.replace_all_uses_with(out)
    return SdpaExpansion(node, result, out, p if not is_op(p, aten.dropout) else p.args[0]), ""


def _autocast_dtype(node: fx.Node, device_type: str) -> Optional[torch.dtype]:
    """The dtype an autocast region around ``node`` casts SDPA's arguments to (None outside one):
    the innermost ``_enter_autocast`` for the operands' device that is not yet exited."""
    regions = []
    for n in node.graph.nodes:
        if n is node:
            break
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_enter_autocast":
            regions.append(n)
        elif name == "_exit_autocast" and n.args[0] in regions:
            regions.remove(n.args[0])
    for region in reversed(regions):
        device, dtype, enabled = region.args[:3]
        if device == device_type:
            return (dtype or torch.get_autocast_dtype(device)) if enabled else None
    return None


def _flash_cpu_serves(q, k, v, mask) -> bool:
    """Whether eager SDPA runs these CPU inputs in its flash kernel (the conditions of
    ``use_flash_attention_cpp``), which alone accepts a mask with ``is_causal``: 4-D operands with
    unit last-dim strides, one head dim for q, k and v, no empty sequence."""
    tensors = (q, k, v, mask)
    return (all(t.device.type == "cpu" for t in tensors) and all(t.dim() == 4 for t in (q, k, v))
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and all(t.stride(-1) == 1 for t in (q, k, v))
            and q.shape[-2] != 0 and k.shape[-2] != 0)


def _in_layout_of(emit, out: fx.Node, like: torch.Tensor) -> Optional[fx.Node]:
    """``out`` with the strides of SDPA's output, which follow the query's layout (``[B, S, H, D]``
    in memory when q is a transposed projection): code after the call may ``view`` it as such."""
    if like.is_contiguous():
        return out
    try:
        order = list(like.dim_order())
    except RuntimeError:  # strides no permutation of a contiguous tensor gives
        return None
    inverse = [order.index(d) for d in range(len(order))]
    dense = emit(aten.clone.default, emit(aten.permute.default, out, order), memory_format=torch.contiguous_format)
    out = emit(aten.permute.default, dense, inverse)
    same = all(statically_known_true(a == b) for a, b in zip(val(out).stride(), like.stride()))
    return out if same else None


def _size(emit, node: fx.Node, dim: int) -> Any:
    size = shape(node)[dim]
    return size if isinstance(size, int) else emit(aten.sym_size.int, node, dim % len(shape(node)))


def _default_scale(emit, q_node: fx.Node, q: torch.Tensor) -> Any:
    """SDPA's ``1/√E``; symbolic when the head dim is."""
    head_dim = q.shape[-1]
    if isinstance(head_dim, int):
        return head_dim ** -0.5
    return emit(operator.pow, emit(aten.sym_size.int, q_node, q.dim() - 1), -0.5)
