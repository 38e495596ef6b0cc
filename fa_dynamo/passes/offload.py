"""The offload pass: attention over host-resident K/V → ``fa_dynamo::cooperative_attention``.

Runs after the attention pass, on its ``fa_dynamo::attention`` nodes. It follows K and V back
along the key axis — through ``cat(..., dim=-2)``, device moves (``.to(device)`` with the dtype
unchanged) and identities — and splits them into pieces that live on the *device* (q's device)
and pieces that live in *host* memory::

    k = torch.cat([past_k.to(q.device), k_new], dim=-2)        # past_k: a CPU tensor
    ...softmax(q @ k.mT) @ v...                                # → fa_dynamo::attention(q, k, v)
        ⇒  fa_dynamo::cooperative_attention(q, k_new, v_new, past_k, past_v, host_first=True)

A piece is host-resident when it is a CPU tensor while q is on an accelerator (a host tensor
copied to the device inside the graph), or a graph *input* on the CPU (a cache input placed on
the host; on a machine without an accelerator that is the only kind, which is how the tests
exercise the rewrite). The copy to the device dies with the rewrite: the host KV is never
gathered on the device. A device-to-host-and-back round trip (``k_new.to("cpu")`` then the
whole cache ``.to(device)``) is seen through: ``k_new`` stays a device piece.

``FA_DYNAMO_OFFLOAD``:

* ``on``: every such site is rewritten; host keys that fit ``FA_DYNAMO_OFFLOAD_BUDGET_MB``
  beside the device keys are copied to the device for the call (0: none is), the rest is served
  cooperatively.
* ``auto``: only sites whose K+V exceed the budget are rewritten, and only the overflow stays on
  the host; a site that fits (statically, or at run time for symbolic sizes) runs as written.
  Without a budget (0) nothing exceeds it and nothing is rewritten.

Every site is logged (``FA_DYNAMO_LOG=info``): rewritten with its split and budget, or left
alone with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.kernels.cooperative import op as _cooperative  # noqa: F401  (registers fa_dynamo::cooperative_attention)
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.matching import (
    aten, describe, is_op, known_equal, normalize_dim, op_arguments, undo_repeat_kv, val,
)

log = logging.getLogger(__name__)

ATTENTION = torch.ops.fa_dynamo.attention.default
COOPERATIVE = torch.ops.fa_dynamo.cooperative_attention.default
_MOVES = (aten.to, aten._to_copy)
_IDENTITIES = (aten.clone, aten.contiguous, aten.alias, aten.detach)
_VIEWS = (aten.slice, aten.narrow, aten.alias)
HOST, DEVICE = "host", "device"


class NotOffloaded(Exception):
    """Raised while planning a site, with the reason it is left as it is."""


@dataclass
class _Plan:
    """How one attention site's K/V split: one host run and at most one device run."""

    k_host: fx.Node
    v_host: fx.Node
    k_device: Optional[fx.Node]
    v_device: Optional[fx.Node]
    host_first: bool
    host_keys: object  # int or SymInt: keys kept in host memory
    device_keys: object


class OffloadPass(GraphPass):
    name = "offload"

    def enabled(self, config: FastAttentionConfig) -> bool:
        return config.offload != "off"

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        graph = gm.graph
        budget_bytes = config.offload_budget_mb << 20
        strategy = config.offload_strategy
        stage_bytes = config.offload_stage_mb << 20
        for node in list(graph.nodes):
            if node.target is not ATTENTION:
                continue
            where = describe(node)
            try:
                plan = _plan(node, config, budget_bytes)
            except NotOffloaded as e:
                report.sites.append(SiteReport(where, False, str(e)))  # the manager logs it
                continue
            _rewrite(graph, node, plan, budget_bytes, strategy, stage_bytes)
            budget = f"budget {config.offload_budget_mb} MiB" if budget_bytes else "no budget: every host key stays on the host"
            summary = (f"{where}: {plan.host_keys} host key(s) {'before' if plan.host_first else 'after'} "
                       f"{plan.device_keys} device key(s), {budget}, strategy {strategy}")
            report.sites.append(SiteReport(where, True, kernel=f"cooperative ({strategy})"))
            log.info("offload: %s", summary)
        graph.eliminate_dead_code()


# --- planning ---------------------------------------------------------------------------------


def _plan(node: fx.Node, config: FastAttentionConfig, budget_bytes: int) -> _Plan:
    args = op_arguments(node)
    if args["q_segments"] is not None:
        raise NotOffloaded("segment masks (packed sequences, chunked attention) are not served by cooperative attention yet")
    if args["alibi_slopes"] is not None:
        raise NotOffloaded("structural ALiBi is not served by cooperative attention yet")
    if args["zero_empty_rows"]:
        raise NotOffloaded("SDPA sites (0 for rows with no visible key) are not served by cooperative attention yet")
    q, k, v = args["q"], args["k"], args["v"]
    k_src, v_src = undo_repeat_kv(k) or k, undo_repeat_kv(v) or v  # the op serves GQA
    if (k_src is k) == (v_src is v):  # both repeated (GQA without copies) or neither
        k, v = k_src, v_src
    device = _device_of(q)
    if device is None:
        raise NotOffloaded("the device of q is unknown")
    k_runs, v_runs = _split_kv(k, v, device)
    layout = [r for r, _ in k_runs]
    if HOST not in layout:
        raise NotOffloaded("K/V are not read from host memory")
    if layout != [r for r, _ in v_runs]:
        raise NotOffloaded("K and V are split differently between host and device memory")
    if layout not in ([HOST], [HOST, DEVICE], [DEVICE, HOST]):
        raise NotOffloaded("host and device pieces of K/V interleave along the key axis")
    for (_, k_nodes), (_, v_nodes) in zip(k_runs, v_runs):
        if not known_equal(_length(k_nodes), _length(v_nodes)):
            raise NotOffloaded("the host/device split of K and V cannot be shown to be the same")
    runs = {r: (k_nodes, v_nodes) for (r, k_nodes), (_, v_nodes) in zip(k_runs, v_runs)}
    host_keys = _length(runs[HOST][0])
    device_keys = _length(runs[DEVICE][0]) if DEVICE in runs else 0
    if config.offload == "auto":
        if budget_bytes == 0:
            raise NotOffloaded("offload=auto without a budget (FA_DYNAMO_OFFLOAD_BUDGET_MB=0): no KV exceeds it")
        kv_bytes = _kv_bytes(k, v)
        if isinstance(kv_bytes, int) and kv_bytes <= budget_bytes:
            raise NotOffloaded(f"K/V ({kv_bytes / 2**20:.2f} MiB) fit the device budget ({config.offload_budget_mb} MiB)")
    return _Plan(
        k_host=runs[HOST][0], v_host=runs[HOST][1],
        k_device=runs[DEVICE][0] if DEVICE in runs else None,
        v_device=runs[DEVICE][1] if DEVICE in runs else None,
        host_first=layout[0] == HOST, host_keys=host_keys, device_keys=device_keys,
    )


def _device_of(node) -> Optional[torch.device]:
    """The device of a tensor node, looking through nodes the attention pass added without metadata."""
    while isinstance(node, fx.Node):
        v = val(node)
        if isinstance(v, torch.Tensor):
            return v.device
        node = node.args[0] if node.args else None
    return None


def _is_move(node: fx.Node) -> bool:
    """``x.to(device)`` / ``_to_copy`` that changes at most the device (not the dtype or layout)."""
    if not is_op(node, *_MOVES) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    out, src = val(node), val(node.args[0])
    return (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.dtype == src.dtype
            and out.layout == src.layout == torch.strided)


class _Walk:
    """Splits K or V into ``(residence, node)`` pieces that concatenated along dim 2 give it.

    Where q is on an accelerator, residence is where a piece's memory is: CPU tensors are the
    host, q's device is the device. Where q is on the CPU too, a graph input (the cache) is the
    host, except that when the program moves some inputs ``.to(device)`` explicitly, those are
    the host ones and inputs used as they are count as the device's.
    """

    def __init__(self, device: torch.device, explicit_moves: bool = False):
        self.device = device
        self.explicit_moves = explicit_moves
        self.saw_moved_input = False

    def pieces(self, node, moved: bool = False) -> list[tuple[str, fx.Node]]:
        if not isinstance(node, fx.Node) or not isinstance(val(node), torch.Tensor) or val(node).dim() != 4:
            raise NotOffloaded(f"K/V ({getattr(node, 'name', node)}) is not a 4-D tensor with known metadata")
        if is_op(node, *_IDENTITIES) or _is_move(node):
            return self.pieces(node.args[0], moved or _is_move(node))
        if is_op(node, aten.cat) and _cat_dim(node) == 2:
            inputs = [x for x in node.args[0] if not _statically_empty(x)]  # cat skips empty (legacy 1-D) inputs
            if inputs and all(isinstance(val(x), torch.Tensor) and val(x).dim() == 4 and val(x).dtype == val(node).dtype
                              for x in inputs):  # (a cat that promotes dtypes is a leaf: its pieces are not K)
                parts = [p for x in inputs for p in self.pieces(x, moved)]
                kinds = {r for r, _ in parts}
                if len(kinds) == 1 and _holds(node, next(iter(kinds)), self.device):
                    return [(next(iter(kinds)), node)]  # already one tensor where its pieces live
                return parts
        return [(self.residence(node, moved), node)]

    def residence(self, leaf: fx.Node, moved: bool) -> str:
        where = val(leaf).device
        if where != self.device:
            if where.type != "cpu":
                raise NotOffloaded(f"{leaf.name} is on {where}, neither q's device ({self.device}) nor the host")
            return HOST
        base = leaf
        while (is_op(base, *_VIEWS, *_IDENTITIES) or _is_move(base)) and isinstance(base.args[0], fx.Node):
            moved = moved or _is_move(base)
            base = base.args[0]  # a slice of a cache input is still the cache's memory
        if where.type == "cpu" and base.op in ("placeholder", "get_attr"):
            self.saw_moved_input |= moved
            return HOST if moved or not self.explicit_moves else DEVICE
        return DEVICE


def _split_kv(k: fx.Node, v: fx.Node, device: torch.device):
    """``(k_runs, v_runs)``: K and V as runs of pieces of one residence (see ``_Walk``)."""
    walk = _Walk(device)
    k_pieces, v_pieces = walk.pieces(k), walk.pieces(v)
    if device.type == "cpu" and walk.saw_moved_input:
        walk = _Walk(device, explicit_moves=True)
        k_pieces, v_pieces = walk.pieces(k), walk.pieces(v)
    return _runs(k_pieces), _runs(v_pieces)


def _statically_empty(node) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    t = val(node)
    return isinstance(t, torch.Tensor) and statically_known_true(t.numel() == 0)


def _holds(node: fx.Node, residence: str, device: torch.device) -> bool:
    """Whether ``node``'s tensor is in the memory of ``residence`` (host: the CPU; device: q's device)."""
    where = val(node).device
    return where.type == "cpu" if residence == HOST else where == device


def _cat_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return normalize_dim(dim, 4)


def _runs(pieces: list) -> list[tuple[str, list[fx.Node]]]:
    """Adjacent pieces of one residence grouped: ``[(residence, [nodes])]``."""
    runs: list = []
    for residence, node in pieces:
        if runs and runs[-1][0] == residence:
            runs[-1][1].append(node)
        else:
            runs.append((residence, [node]))
    return runs


def _length(nodes: list[fx.Node]):
    return sum(val(n).shape[2] for n in nodes)


def _kv_bytes(k: fx.Node, v: fx.Node):
    """Bytes of the whole K and V of the site (an int, or a SymInt expression)."""
    total = 0
    for t in (val(k), val(v)):
        total = total + t.numel() * t.element_size()
    return total


# --- rewriting --------------------------------------------------------------------------------


def _emit_run(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    """One tensor for a run of pieces (a ``cat`` on their side of the link if there are several)."""
    return nodes[0] if len(nodes) == 1 else graph.call_function(aten.cat.default, (list(nodes), 2))


def _rewrite(graph: fx.Graph, node: fx.Node, plan: _Plan, budget_bytes: int, strategy: str, stage_bytes: int) -> None:
    shared = ("q", "bias", "mask", "scale", "softcap", "fill", "min_offset", "max_offset", "kernel", "block_q",
              "block_k", "fill_added")
    args = op_arguments(node)
    with graph.inserting_before(node):
        k_host, v_host = _emit_run(graph, plan.k_host), _emit_run(graph, plan.v_host)
        k_dev = None if plan.k_device is None else _emit_run(graph, plan.k_device)
        v_dev = None if plan.v_device is None else _emit_run(graph, plan.v_device)
        new = graph.call_function(COOPERATIVE, (), {
            **{name: args[name] for name in shared}, "k_dev": k_dev, "v_dev": v_dev, "k_host": k_host,
            "v_host": v_host, "host_first": plan.host_first, "budget_bytes": budget_bytes, "strategy": strategy,
            "stage_bytes": stage_bytes,
        })
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
