"""The tiling-AllReduce pass: ``matmul → all_reduce → wait`` ⇒ C row chunks, each reduced at once.

In tensor-parallel inference every row-parallel linear (attention ``o_proj``, MLP ``down_proj``)
ends in an all_reduce of its partial sums, and the devices idle while the bytes move. This
pass cuts the matmul into C chunks along the token (M) rows and issues each chunk's all_reduce
as soon as the chunk is computed, so chunk i's communication overlaps chunk i+1's compute::

    y = x @ W                          y_0 = x[r_0] @ W;  h_0 = all_reduce(y_0)
    h = all_reduce(y)          ⇒       y_1 = x[r_1] @ W;  h_1 = all_reduce(y_1)   # overlaps h_0
    z = wait(h)                        ...
    ... (independent work)             ... (independent work)
    use(z)                             z = cat(wait(h_0), wait(h_1), ...);  use(z)

The sites it accepts are the functional collectives every front end produces in a
pre-dispatch ATen graph (checked in tests/distributed/test_allreduce.py):

* ``dist.all_reduce(y)`` in compiled code: Dynamo rewrites it to
  ``_c10d_functional.all_reduce(y) → wait_tensor → aten.copy_(y, reduced)``;
* ``funcol.all_reduce(y, "sum", group)``: ``all_reduce → wait_tensor``;
* DTensor ``RowwiseParallel``: the collective exists only once aot_autograd has desugared the
  DTensors (``mm → _unsafe_view → all_reduce → wait_tensor``); the backend runs the passes on
  that forward graph for tensor-subclass models (``fa_dynamo.backend``);

where ``y`` is ``linear`` / ``mm`` / ``addmm`` / ``matmul`` of a token-major input and a 2-D
weight, followed by any row-major reshapes (``view``/``reshape``/``unsqueeze``/``squeeze``/
``flatten``) and dtype casts. A bias or residual added after the wait stays where it is. Every
elementwise reduction (sum, avg, max, min, product) commutes with cutting rows, so the result
is the untiled one. The chunk count C is ``FA_DYNAMO_ALLREDUCE_CHUNKS``, or the cost model's
choice (``fa_dynamo.passes.allreduce.cost``) when that is 0; the model keeps decode-sized M
untiled. With a dynamic token count, C is chosen at the size hint and a guard on M keeps the
choice valid (decode and prefill compile into separate graphs). Without an initialized process
group the pass does nothing.

When the matmul is an ``o_proj`` over a fused attention (``fa_dynamo::attention → [0] →
transpose(1, 2) → reshape [B, Sq, H·Dv] → linear``), the chunks cut the sequence instead, and
the attention with it: chunk i is attention of query rows r_i, its o_proj and its all_reduce, so
the attention of chunk i+1 overlaps the all_reduce of chunk i (the paper's form)::

    a = attention(q, k, v)             a_0 = attention(q[:, :, r_0], k, v);  h_0 = all_reduce(o_proj(a_0))
    h = all_reduce(o_proj(a))   ⇒      a_1 = attention(q[:, :, r_1], k, v);  h_1 = all_reduce(o_proj(a_1))
                                       z = cat(wait(h_0), wait(h_1), ..., dim=1)

Band offsets shift by each chunk's first row; biases, masks and segment ids with a query-row dim
are sliced (``attention_split.query_row_arguments``). A chain that is not exactly that leaves the attention whole
(the matmul is still tiled by token rows) and the log says why.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fa_dynamo import kernels as _kernels  # noqa: F401  (registers fa_dynamo::attention)
from fa_dynamo.config import FastAttentionConfig
from fa_dynamo.passes.allreduce import cost
from fa_dynamo.passes.allreduce.attention_split import AttentionChain, NotSplit, attention_rows, match_attention
from fa_dynamo.passes.base import GraphPass, PassReport, SiteReport
from fa_dynamo.passes.matching import aten, describe, is_op, op_arguments, val

log = logging.getLogger(__name__)
c10d = torch.ops._c10d_functional

_MATMULS = (aten.linear, aten.mm, aten.addmm, aten.matmul)
# Ops that reinterpret a tensor in row-major order without moving elements: cat(chunks) then
# the same op equals the op then the reduction.
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.flatten)
_CASTS = (aten.to, aten._to_copy)
_REDUCE_OPS = ("sum", "avg", "max", "min", "product")

Size = Union[int, torch.SymInt]


class NotTiled(Exception):
    """Raised inside matching with the reason a site is left alone."""


@dataclass
class AllReduceSite(SiteReport):
    """A site report that also says how many chunks the all_reduce was cut into."""

    chunks: int = 1
    split_attention: bool = False  # the attention producing the matmul input was split with it


class AllReduceReport(PassReport):
    def headline(self) -> str:
        chunks = ", ".join(str(s.chunks) for s in self.sites if s.fused)
        split = sum(s.split_attention for s in self.sites)
        return (f"tiled {len(self.fused)}/{len(self.sites)} all_reduce sites" + (f" (chunks: {chunks})" if chunks else "")
                + (f", {split} with their attention split by query rows" if split else ""))


@dataclass
class _Site:
    reduce: fx.Node  # _c10d_functional.all_reduce
    wait: fx.Node  # its wait_tensor
    copy: Optional[fx.Node]  # aten.copy_(y, reduced) of the in-place dist.all_reduce form
    matmul: fx.Node
    chain: list[fx.Node] = field(default_factory=list)  # reshapes/casts from matmul to all_reduce input
    m: Size = 0  # token rows (product of the matmul output's leading dims)
    k: Size = 0  # contraction
    n: Size = 0  # output features
    world: int = 1
    attention: Optional[AttentionChain] = None  # set when the chunks also split the attention


class AllReducePass(GraphPass):
    name = "allreduce"
    report_type = AllReduceReport

    def enabled(self, config: FastAttentionConfig) -> bool:
        return config.allreduce

    def run(self, gm: fx.GraphModule, config: FastAttentionConfig, report: PassReport) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return  # no process group: nothing can be tensor-parallel
        graph = gm.graph
        for reduce in list(graph.nodes):
            if not is_op(reduce, c10d.all_reduce) or reduce.graph is not graph:
                continue
            try:
                site = _match(reduce)
                chunks = _chunk_count(site, config)
                chunks = _split_attention_too(site, chunks)
                _rewrite(graph, site, chunks)
            except NotTiled as e:
                report.sites.append(AllReduceSite(_where(reduce), False, str(e)))
                continue
            report.sites.append(AllReduceSite(_where(reduce), True, chunks=chunks, split_attention=site.attention is not None))


def _where(reduce: fx.Node) -> str:
    """Like ``describe``, at the innermost frame outside torch (the collective's own frames are torch's)."""
    trace = reduce.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    user = [f for f in frames if f"{os.sep}torch{os.sep}" not in f]
    if not user:
        return describe(reduce)
    path, _, rest = user[-1].removeprefix("File ").partition(", line ")
    return f"{reduce.name} ({os.path.basename(path.strip(chr(34)))}:{rest.split(',')[0]})"


# --- matching ---------------------------------------------------------------------------------


def _match(reduce: fx.Node) -> _Site:
    """``matmul → (reshape | cast)* → all_reduce → wait_tensor [→ copy_ into the matmul output]``."""
    op = reduce.args[1] if len(reduce.args) > 1 else reduce.kwargs.get("reduceOp")
    if str(op).lower() not in _REDUCE_OPS:
        raise NotTiled(f"reduce op {op!r} is not an elementwise reduction this pass knows")
    waits = list(reduce.users)
    if len(waits) != 1 or not is_op(waits[0], c10d.wait_tensor):
        raise NotTiled("the all_reduce is not waited on exactly once")
    wait = waits[0]
    y = reduce.args[0]
    if not isinstance(y, fx.Node):
        raise NotTiled("the all_reduce input is not a graph value")

    copy = None
    for user in y.users:
        if user is reduce:
            continue
        if is_op(user, aten.copy_) and user.args[0] is y and user.args[1] is wait and copy is None:
            copy = user  # dist.all_reduce(y) writes the result back into y
        else:
            raise NotTiled(f"the partial sums are also read by {user.name}")

    chain: list[fx.Node] = []
    node = y
    while not is_op(node, *_MATMULS):
        if is_op(node, *_RESHAPES):
            pass
        elif is_op(node, *_CASTS) and _same_device(node, node.args[0]):
            pass
        else:
            raise NotTiled(f"the all_reduce input comes from {getattr(node, 'target', node)}, not a matmul")
        chain.insert(0, node)
        node = node.args[0]
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            raise NotTiled("an intermediate between the matmul and the all_reduce is used elsewhere")
    site = _Site(reduce, wait, copy, node, chain)
    _read_matmul(site)
    site.world = _world_size(reduce)
    return site


def _same_device(a: fx.Node, b: Any) -> bool:
    va, vb = val(a), val(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.device == vb.device


def _read_matmul(site: _Site) -> None:
    """Check the matmul is token-major input × 2-D weight, and read M, K, N."""
    mm = site.matmul
    if mm.kwargs and not is_op(mm, aten.addmm):
        raise NotTiled(f"{mm.target} with keyword arguments")
    x, w = (mm.args[1], mm.args[2]) if is_op(mm, aten.addmm) else (mm.args[0], mm.args[1])
    out, wv = val(mm), val(w)
    if not isinstance(out, torch.Tensor) or not isinstance(wv, torch.Tensor):
        raise NotTiled("the matmul has no recorded shapes")
    if wv.dim() != 2:
        raise NotTiled(f"the weight has {wv.dim()} dims (a batched matmul, not a linear layer)")
    if out.dim() < 2:
        raise NotTiled("the matmul output has no token dim")
    if is_op(mm, aten.addmm):
        bias = val(mm.args[0])
        if not isinstance(bias, torch.Tensor) or not (bias.dim() == 1 or (bias.dim() == 2 and bias.shape[0] == 1)):
            raise NotTiled("addmm's bias is not one row broadcast over the tokens")
    site.m, site.k, site.n = math.prod(out.shape[:-1]), wv.shape[1 if is_op(mm, aten.linear) else 0], out.shape[-1]
    if isinstance(site.m, int) and site.m < 2:
        raise NotTiled("a single token row: nothing to tile")


def _world_size(reduce: fx.Node) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = reduce.args[2] if len(reduce.args) > 2 else reduce.kwargs.get("group_name")
    try:
        return _resolve_process_group(group).size()
    except Exception as e:  # an unknown group name: not ours to guess
        raise NotTiled(f"process group {group!r} cannot be resolved ({e})") from None


# --- the attention feeding the matmul (the paper's form) ---------------------------------------

def _split_attention_too(site: _Site, chunks: int) -> int:
    """Set ``site.attention`` when the C chunks can also cut the attention's query rows; the chunk
    count is capped at Sq then. Otherwise the matmul alone is tiled, and the log says why."""
    try:
        chain = match_attention(site.matmul)
        if chain is None:
            return chunks
        if isinstance(chain.seq, int):
            if chain.seq < 2:
                raise NotSplit("a single query row")
            chunks = min(chunks, chain.seq)
        elif not bool(chain.seq >= chunks):  # guard: every chunk holds at least one query row
            raise NotSplit(f"fewer query rows than chunks ({chunks})")
    except NotSplit as e:
        log.info("allreduce at %s: the attention feeding the matmul stays whole: %s", _where(site.reduce), e)
        return chunks
    site.attention = chain
    return chunks


# --- choosing C -------------------------------------------------------------------------------


def _chunk_count(site: _Site, config: FastAttentionConfig) -> int:
    """C from the config, or from the cost model; guards a dynamic M so the choice stays valid."""
    m, out = site.m, val(site.matmul)
    static = isinstance(m, int)
    if config.allreduce_chunks > 0:
        chunks = config.allreduce_chunks
        if static:
            chunks = min(chunks, m)
        elif not bool(m >= chunks):  # guard: every chunk holds at least one row
            raise NotTiled(f"fewer token rows than FA_DYNAMO_ALLREDUCE_CHUNKS={chunks}")
        if chunks < 2:
            raise NotTiled("FA_DYNAMO_ALLREDUCE_CHUNKS gives one chunk")
        return chunks
    profile = cost.profile_for(out.device.type)
    if profile is None:
        raise NotTiled(f"no cost model for device {out.device.type!r}; set FA_DYNAMO_ALLREDUCE_CHUNKS")
    k, n, elem = _hint(site.k), _hint(site.n), out.dtype.itemsize
    if static:
        chunks = cost.choose_chunks(m, k, n, elem, site.world, profile)
        if chunks < 2:
            raise NotTiled(f"M={m} rows: the cost model ({profile.name}) predicts no gain from tiling")
        return chunks
    chunks = cost.choose_chunks(_hint(m), k, n, elem, site.world, profile)
    threshold = cost.min_rows_to_tile(k, n, elem, site.world, profile)
    if threshold is None or chunks < 2 or not bool(m >= max(threshold, chunks)):  # guard on M either way
        raise NotTiled(f"M≈{_hint(m)} rows (dynamic): the cost model ({profile.name}) predicts no gain from tiling")
    return chunks


def _hint(size: Size) -> int:
    """A size's value at the example inputs (itself when static)."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return int(optimization_hint(size))


# --- rewriting --------------------------------------------------------------------------------


def _rewrite(graph: fx.Graph, site: _Site, chunks: int) -> None:
    mm, reduce, attention = site.matmul, site.reduce, site.attention
    addmm = is_op(mm, aten.addmm)
    x = mm.args[1] if addmm else mm.args[0]
    out = val(mm)
    lead = list(out.shape[:-1])
    with graph.inserting_before(mm):
        if attention is not None:  # chunks of query rows: [B, rows, H·Dv] inputs, cut along dim 1
            q = op_arguments(attention.attention)["q"]
            bounds = _bounds(graph, attention.seq, lambda: graph.call_function(aten.sym_size.int, (q, 2)), chunks)
            part_of = functools.partial(attention_rows, graph, attention)
        else:  # chunks of token rows: [rows, K] inputs
            k = site.k if isinstance(site.k, int) else graph.call_function(aten.sym_size.int, (x, -1))
            rows = x if len(lead) == 1 else graph.call_function(aten.reshape.default, (x, [-1, k]))
            bounds = _bounds(graph, site.m, lambda: graph.call_function(aten.sym_size.int, (rows, 0)), chunks)
            part_of = lambda start, end: graph.call_function(aten.slice.Tensor, (rows, 0, start, end))  # noqa: E731
        handles = []
        for start, end in bounds:  # chunk i's all_reduce is issued before chunk i+1 is computed
            part = part_of(start, end)
            args = (mm.args[0], part, *mm.args[2:]) if addmm else (part, *mm.args[1:])
            y = graph.call_function(mm.target, args, dict(mm.kwargs))
            for node in site.chain:
                if is_op(node, *_CASTS):
                    y = graph.call_function(node.target, (y, *node.args[1:]), dict(node.kwargs))
            handles.append(graph.call_function(reduce.target, (y, *reduce.args[1:]), dict(reduce.kwargs)))

    readers = [u for u in site.wait.users if u is not site.copy] + (list(site.copy.users) if site.copy else [])
    anchor = _earliest(graph, readers) or site.copy or site.wait
    with graph.inserting_before(anchor):
        waits = [graph.call_function(site.wait.target, (h,)) for h in handles]
        result = graph.call_function(aten.cat.default, (waits, 0 if attention is None else 1))
        if attention is None and len(lead) != 1:
            sizes = [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (x, i)) for i, d in enumerate(lead)]
            n = site.n if isinstance(site.n, int) else graph.call_function(aten.sym_size.int, (result, 1))
            result = graph.call_function(aten.reshape.default, (result, sizes + [n]))
        for node in site.chain:
            if is_op(node, *_RESHAPES):
                result = graph.call_function(node.target, (result, *node.args[1:]), dict(node.kwargs))

    site.wait.replace_all_uses_with(result, delete_user_cb=lambda user: user is not site.copy)
    dead = ([attention.attention, *attention.unread, *attention.nodes] if attention else []) + [mm, *site.chain, reduce, site.wait]
    if site.copy is not None:
        site.copy.replace_all_uses_with(result)
        dead.append(site.copy)
    for node in reversed(dead):
        assert not node.users, f"{node.name} still has users after the rewrite"
        graph.erase_node(node)


def _bounds(graph: fx.Graph, size: Size, size_node, chunks: int) -> list[tuple[Size, Size]]:
    """``chunks`` ranges covering ``[0, size)``; for a symbolic size, as SymInt arithmetic on
    ``size_node()`` (the size read from a tensor that outlives the rewrite)."""
    if isinstance(size, int):
        return cost.chunk_bounds(size, chunks)
    total = size_node()
    edges = [0] + [graph.call_function(operator.floordiv, (graph.call_function(operator.mul, (total, i)), chunks))
                   for i in range(1, chunks)] + [total]
    return list(zip(edges[:-1], edges[1:]))


def _earliest(graph: fx.Graph, nodes: list[fx.Node]) -> Optional[fx.Node]:
    if not nodes:
        return None
    wanted = set(nodes)
    for node in graph.nodes:
        if node in wanted:
            return node
    return None
