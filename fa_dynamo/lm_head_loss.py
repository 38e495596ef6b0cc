"""The vocabulary projection and its cross-entropy loss, with one fused, chunked backward.

A causal LM's loss reads ``logits = h @ Wᵀ`` ([N, vocab]: 262 MB at 2048 tokens × 32000 in
fp32). Autograd's backward writes ``dlogits = (softmax − onehot) · g`` as a second tensor of that
size, fresh pages every step, and reads it back in the projection's two GEMMs. Here the backward
walks the vocabulary in chunks: each chunk's ``dlogits`` is built in one reused buffer from the
saved logits and log-sum-exp, and consumed at once by ``dW[chunk] = dᵀ·h`` and ``dh += d·W[chunk]``
(measured alone: 0.46–0.48 s against 0.54–0.57 s for the loss backward and the two GEMMs).

The graph keeps the forward's heavy work for Inductor: the projection (taken out of autograd) and
the rows' log-sum-exp stay in the compiled model; ``LMHeadCrossEntropy`` only gathers the target
logits, and carries the gradient. It runs outside aot_autograd (the loss part of
``fa_dynamo.loss_split``), so when the logits' gradient is unused it is ``None``, not zeros.

Matched: ``cross_entropy_loss(view(linear(h, W[, b])[.float()], [-1, V]), target)`` with no class
weights, no label smoothing, ``mean`` or ``sum`` reduction, any ``ignore_index``, all in float32,
``W`` a parameter and the logits a graph output (transformers' ``ForCausalLMLoss``, BERT's MLM loss).
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from fa_dynamo.passes.matching import aten, computed_from, describe, insert_with_val, op_arguments, val

log = logging.getLogger(__name__)

CHUNK = 4096
"""Vocabulary entries per backward chunk: [N, 4096] fp32 is 32 MiB at 2048 tokens (2048-8192 measured alike)."""
_REDUCTIONS = {1: "mean", 2: "sum"}


class LMHeadCrossEntropy(torch.autograd.Function):
    """``(logits, loss)`` from the projection's input ``h [..., H]``, weight ``W [V, H]`` and bias
    ``[V]`` (or None), the logits it produced ``[..., V]`` (outside autograd), their rows'
    log-sum-exp ``[N]`` and the targets ``[N]``; gradients for ``h``, ``W`` and the bias from the
    loss's and the logits' gradients."""

    @staticmethod
    def forward(ctx, h, weight, bias, logits, lse, target, reduction: str, ignore_index: int):
        rows = logits.reshape(-1, logits.shape[-1])
        valid = target != ignore_index
        if target.device.type == "cpu" and not is_fake(target):  # elsewhere the gather asserts, as eager's kernel does
            _check_targets(target, valid, rows.shape[-1])
        picked = rows.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        per_row = torch.where(valid, lse - picked, 0.0)
        loss = per_row.sum() / valid.sum() if reduction == "mean" else per_row.sum()
        ctx.save_for_backward(h, weight, bias, logits, lse, target)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.set_materialize_grads(False)  # an unused logits gradient arrives as None
        # a detached alias, not the input itself (autograd would make that a view, which may not be
        # written in place); writing it in place before backward fails autograd's saved-tensor check
        return logits.detach(), loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits: Optional[torch.Tensor], grad_loss: Optional[torch.Tensor]):
        h, weight, bias, logits, lse, target = ctx.saved_tensors
        vocab = weight.shape[0]
        h_rows, rows = h.reshape(-1, h.shape[-1]), logits.reshape(-1, vocab)
        g_rows = None if grad_logits is None else grad_logits.reshape(-1, vocab)
        valid = target != ctx.ignore_index
        if grad_loss is None:
            scale = torch.zeros_like(lse)
        else:
            per = grad_loss / valid.sum() if ctx.reduction == "mean" else grad_loss
            scale = torch.where(valid, per, 0.0)  # ignored rows get no gradient, even when none is valid
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(h_rows) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if need_b else None
        chunk = rows.new_empty(rows.shape[0], min(CHUNK, vocab))
        for v0 in range(0, vocab, CHUNK):
            v1 = min(v0 + CHUNK, vocab)
            d = chunk[:, : v1 - v0]
            torch.sub(rows[:, v0:v1], lse.unsqueeze(1), out=d).exp_().mul_(scale.unsqueeze(1))  # softmax · g
            local = target - v0  # − onehot · g, without a host sync: rows whose target lies elsewhere add 0
            inside = valid & (local >= 0) & (local < v1 - v0)
            d.scatter_add_(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1), torch.where(inside, -scale, 0.0).unsqueeze(1))
            if g_rows is not None:
                d.add_(g_rows[:, v0:v1])
            if dw is not None:
                torch.mm(d.t(), h_rows, out=dw[v0:v1])
            if dh is not None:
                dh.addmm_(d, weight[v0:v1])
            if db is not None:
                torch.sum(d, 0, out=db[v0:v1])
        return None if dh is None else dh.view_as(h), dw, db, None, None, None, None, None


def lm_head_cross_entropy(h, weight, bias, logits, lse, target, reduction: str, ignore_index: int):
    """The graph's call of ``LMHeadCrossEntropy`` (a plain function: FX calls it by name)."""
    return LMHeadCrossEntropy.apply(h, weight, bias, logits, lse, target, reduction, ignore_index)


def _check_targets(target: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    """Eager's error for a class index out of range (cross_entropy raises; a gather would say less)."""
    bad = valid & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds (cross_entropy over {vocab} classes).")


def fuse(gm: fx.GraphModule, out: fx.Node, loss: set[fx.Node], parameters: set[fx.Node]) -> Optional[set[fx.Node]]:
    """Rewrite ``out``'s loss into ``lm_head_cross_entropy`` in place; returns the new loss nodes
    (the call and what reads it), or None with the graph untouched when the loss is not one
    this serves (the reason at debug level)."""
    found = _match(out, loss, parameters)
    if isinstance(found, str):
        log.debug("loss of %s not fused with the vocabulary projection: %s", out.name, found)
        return None
    linear, view, ce, target, reduction, ignore_index = found
    h, weight, bias = (*linear.args, None)[:3]
    linear.args = tuple(insert_with_val(linear, aten.detach.default, (x,)) if isinstance(x, fx.Node) else x
                        for x in linear.args)  # the projection runs in the compiled model, outside autograd
    rows = insert_with_val(ce, aten.view.default, (linear, [-1, val(weight).shape[0]]))
    lse = insert_with_val(ce, aten.logsumexp.default, (rows, [-1]))
    call = insert_with_val(ce, lm_head_cross_entropy, (h, weight, bias, linear, lse, target, reduction, ignore_index))
    logits, value = (insert_with_val(ce, operator.getitem, (call, i)) for i in (0, 1))
    ce.replace_all_uses_with(value)
    gm.graph.output_node().replace_input_with(out, logits)
    for node in (ce, view) + ((out,) if out is not linear else ()):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    log.info("cross_entropy over %s fused with the vocabulary projection's backward", describe(out))
    return {call, logits, value} | (loss - {ce, view})


def _match(out: fx.Node, loss: set[fx.Node], parameters: set[fx.Node]):
    """``(linear, view, cross_entropy, target, reduction, ignore_index)``, or why not."""
    linear = out
    if out.target is aten.to.dtype and out.args[1:] == (torch.float32,):
        linear = out.args[0]
        if set(linear.users) != {out}:
            return "the projection's output is read by more than its float32 cast"
    if linear.target is not aten.linear.default or linear.kwargs:
        return "the output is not a linear (or its float32 cast)"
    h, weight, bias = (*linear.args, None)[:3]
    if weight.op != "placeholder" or weight not in parameters:
        return "the projection's weight is not a parameter"
    if bias is not None and (not isinstance(bias, fx.Node) or val(bias) is None or val(bias).dim() != 1):
        return "the projection's bias is not a [vocab] tensor"
    if any(val(n) is None or val(n).dtype != torch.float32 for n in (h, weight, linear, out, bias) if n is not None):
        return "not float32 throughout (autocast or a low-precision model)"
    views = [n for n in out.users if n in loss]
    if len(views) != 1 or views[0].target not in (aten.view.default, aten.reshape.default) or len(views[0].users) != 1:
        return "the loss does not read the logits through one [rows, vocab] view"
    view = views[0]
    ce = next(iter(view.users))
    if ce.target is not aten.cross_entropy_loss.default or ce.args[0] is not view:
        return "the loss is not cross_entropy over the logits"
    if val(view).dim() != 2 or val(view).shape[-1] != val(weight).shape[0]:
        return "the logits are not viewed as [rows, vocab]"
    if not isinstance(val(weight).shape[0], int):
        return "the vocabulary size is symbolic"
    args = op_arguments(ce)
    if args["weight"] is not None or args["label_smoothing"] != 0.0 or args["reduction"] not in _REDUCTIONS:
        return "cross_entropy with class weights, label smoothing or no reduction"
    if not isinstance(args["ignore_index"], int):
        return "ignore_index is not a constant"
    target = args["target"]
    if not isinstance(target, fx.Node) or target in loss or val(target).dim() != 1:
        return "the targets are not class indices computed apart from the logits"
    if loss - {view, ce} - computed_from(ce):
        return "the loss reads the logits elsewhere too"
    return linear, view, ce, target, _REDUCTIONS[args["reduction"]], args["ignore_index"]
