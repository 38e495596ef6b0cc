"""Compile a loss apart from the output it reads, so that output gets no gradient of zeros.

A causal LM called with labels returns its logits *and* the loss computed from them
(transformers' ``model(ids, labels=ids)``). Compiled as one graph, both are outputs of one
autograd function, whose backward takes a gradient for each: after ``loss.backward()`` the logits'
gradient is undefined, so autograd materializes it as zeros and the compiled backward adds them in
— a [B, S, vocab] tensor (262 MB at 2048 tokens × 32000 in fp32: ~50 ms per step here, fresh pages
to fault in, fill and read back). Eager PyTorch never builds it.

Cut the graph between such an output and its *loss*: every node computed from the output that
reads no parameter (no graph input that requires grad). Each part is compiled on its own (as
Dynamo's DDPOptimizer compiles its buckets, with its ``SubmodCompiler``); the logits are then an
input of the loss part, and autograd hands the loss's gradient for them straight to the first
part. Values and gradients are unchanged; Inductor only loses fusion across the cut, where there
is none to lose (the loss starts from a materialized output).

The loss part runs after the whole model part, so the cut is refused where that order could
matter: a write, an autocast or grad-mode switch in the model after the loss's first node, or a
random op in the loss.

Model compute downstream of an output (a layer reading the K/V-cache tensors it also returns) is
not a loss — it reads weights — and is never cut off.
"""

from __future__ import annotations

import logging
import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fa_dynamo import lm_head_loss
from fa_dynamo.passes.matching import computed_from

log = logging.getLogger(__name__)


def loss_nodes(gm: fx.GraphModule, example_inputs: list, fuse_lm_head: bool = True) -> tuple[set[fx.Node], list[fx.Node]]:
    """``(loss, cut_at)``: the nodes of every loss computed from an output that needs a gradient,
    and those outputs; empty when there is none, when grad mode is off, or inside Dynamo's
    DDPOptimizer (its buckets keep per-part metadata on the one tracing context, which a second
    split inside a bucket would overwrite). With ``fuse_lm_head``, a cross-entropy over a
    vocabulary projection is rewritten in place first (``fa_dynamo.lm_head_loss``)."""
    if not torch.is_grad_enabled():
        return set(), []
    context = torch._guards.TracingContext.try_get()
    if context is not None and getattr(context, "ddp_optimizer_ctx", None) is not None:
        log.debug("inside DDPOptimizer's split: the loss is compiled with the rest of its bucket")
        return set(), []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    parameters = {p for p, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad}
    needs_grad = _needing_grad(gm, parameters)
    output = gm.graph.output_node()
    loss, cut_at = set(), []
    for out in dict.fromkeys(a for a in pytree.tree_leaves(output.args) if isinstance(a, fx.Node)):
        if out not in needs_grad or all(user is output for user in out.users):
            continue
        below = computed_from(out)
        if all(_pure(n) and not _random(n) and not parameters.intersection(n.all_input_nodes) for n in below):
            loss |= below
            cut_at.append(out)
    if loss and (late := _stateful_after(gm, loss)):
        log.debug("loss not compiled apart: %s runs after it and would move before it", late.name)
        return set(), []
    if fuse_lm_head and len(cut_at) == 1:
        loss = lm_head_loss.fuse(gm, cut_at[0], loss, parameters) or loss
    return loss, cut_at


def compile_split(gm: fx.GraphModule, example_inputs: list, loss: set[fx.Node],
                  compile_part: Callable[[fx.GraphModule, list], Callable]) -> fx.GraphModule:
    """``gm`` as two compiled parts, the model and its loss, called in turn by an FX module."""
    from torch._dynamo.backends.distributed import SubmodCompiler
    from torch._dynamo.utils import detect_fake_mode
    from torch.fx.passes.split_module import split_module

    def compile_or_keep(part: fx.GraphModule, inputs: list) -> Callable:
        # the fused loss's autograd.Function must stay outside aot_autograd: it runs as it is
        if any(n.target is lm_head_loss.lm_head_cross_entropy for n in part.graph.nodes):
            return part
        return compile_part(part, inputs)

    split = split_module(gm, None, lambda node: int(node in loss), keep_original_order=True)
    fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.fake_tensor.FakeTensorMode()
    with torch._dynamo.utils._disable_saved_tensors_hooks_during_tracing():
        SubmodCompiler(split, compile_or_keep, fake_mode).run(*example_inputs)
    split.recompile()
    return split


def _needing_grad(gm: fx.GraphModule, parameters: set[fx.Node]) -> set[fx.Node]:
    """Floating-point tensors computed from a parameter: what requires grad, except through ops
    returning tuples (``split``, ``max.dim``), where the search stops (a cut is missed, never wrong)."""
    found = set(parameters)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if (node.op == "call_function" and isinstance(value, torch.Tensor) and value.is_floating_point()
                and found.intersection(node.all_input_nodes)):
            found.add(node)
    return found


def _stateful_after(gm: fx.GraphModule, loss: set[fx.Node]) -> Optional[fx.Node]:
    """A model node after the loss's first node that is not pure (a write the loss might read, an
    autocast or grad-mode switch), or None: the model part runs whole before the loss part, so
    such a node would move ahead of the loss (``split_module`` also refuses state switches there)."""
    started = False
    for node in gm.graph.nodes:
        started = started or node in loss
        if started and node not in loss and node.op == "call_function" and not _pure(node):
            return node
    return None


def _random(node: fx.Node) -> bool:
    """An op drawing random numbers: moved to the other part, it would change the order of the draws."""
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _pure(node: fx.Node) -> bool:
    """An op without side effects: an ATen op whose schema mutates nothing, or a getitem."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.is_mutable
