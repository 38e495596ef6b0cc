"""Small helpers shared by the passes: recognizing ATen ops and reading node metadata.

The passes run on pre-dispatch ATen graphs (see ``fa_dynamo.normalize``), where every spelling
of an operation has collapsed to one overload family: ``q @ k.mT``, ``torch.matmul`` and
``Tensor.matmul`` are all ``aten.matmul``; ``F.softmax`` and ``Tensor.softmax`` are
``aten.softmax.int``.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

# Op families, as the passes read them.
MATMULS = (aten.matmul, aten.bmm, aten.einsum)
CASTS = (aten.to, aten._to_copy, aten.type_as)
IDENTITIES = (aten.clone, aten.contiguous, aten.alias)
VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)
# In-place forms count as their functional forms in the score chain: each chain node has one
# user, so nothing else sees the scores before or after the write.
MUL, DIV, ADD = (aten.mul, aten.mul_), (aten.div, aten.div_), (aten.add, aten.add_)
MASKED_FILL = (aten.masked_fill, aten.masked_fill_)


def is_op(node: Any, *packets) -> bool:
    """True if ``node`` calls an overload of one of the given op packets (``aten.add`` ...)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return any(packet is p or target is p for p in packets)


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """A call of an op overload as ``{argument name: value}``, whether passed by position or by
    name; arguments left out have their schema default."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def val(node: Any) -> Any:
    """The example value recorded for ``node`` (a FakeTensor, SymInt ...), or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: fx.Node) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: fx.Node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def python_scalar(arg: Any) -> Optional[float]:
    """A Python number argument (not a tensor, not a bool) as float, else None."""
    if isinstance(arg, bool) or not isinstance(arg, numbers.Number):
        return None
    return float(arg)


def is_symbolic_scalar(arg: Any) -> bool:
    """An FX node producing a SymInt/SymFloat (e.g. ``sqrt(head_dim)`` under dynamic shapes)."""
    return isinstance(arg, fx.Node) and isinstance(val(arg), (torch.SymInt, torch.SymFloat, int, float))


def normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def describe(node: fx.Node) -> str:
    """A short location for logs: the node name, and the user's file:line when known."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return node.name
    last = frames[-1]  # innermost user frame: 'File "path", line N, in fn'
    path, _, rest = last.removeprefix("File ").partition(", line ")
    line = rest.split(",")[0]
    return f"{node.name} ({path.strip(chr(34)).split('/')[-1]}:{line})"


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "is_view", False)


def _written_by(node: fx.Node) -> list[fx.Node]:
    """The base nodes an in-place op writes (views walked back to their base)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.is_mutable:
        return []
    bases = []
    for arg, value in zip(schema.arguments, node.args):
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node):
            while _is_view(value):
                value = value.args[0]
            bases.append(value)
    return bases


def _with_views(bases: set[fx.Node]) -> set[fx.Node]:
    tainted: set[fx.Node] = set()
    stack = list(bases)
    while stack:
        n = stack.pop()
        if n in tainted:
            continue
        tainted.add(n)
        stack.extend(u for u in n.users if _is_view(u))
    return tainted


def mutated_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose storage some op writes in place, with every view of that storage.

    A pass that reads such a node anywhere but where the original graph read it (a peeled
    operand, a mask it interprets) could see the wrong version of the data, so it must not.
    """
    return _with_views({b for node in graph.nodes for b in _written_by(node)})


def writes_between(first: fx.Node, last: fx.Node) -> set[fx.Node]:
    """Nodes (with their views) written in place by ops strictly between two nodes."""
    writes: set[fx.Node] = set()
    node = first.next
    while node is not last and node.op != "root":
        writes.update(_written_by(node))
        node = node.next
    return _with_views(writes)


def round_to(value: float, dtype: Optional[torch.dtype]) -> float:
    """``value`` as stored in a tensor of ``dtype`` (overflow gives ±inf, as in eager)."""
    if dtype is None or not dtype.is_floating_point:
        return value
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def insert_with_val(before: fx.Node, target, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """A node ``target(*args, **kwargs)`` inserted before ``before``, with its ``val`` computed on
    its inputs' fake tensors, so later matching can read its shape and dtype. Nodes a refused
    site leaves unused are removed by the pass's dead-code elimination."""
    kwargs = kwargs or {}
    inputs = [n.meta.get("val") for n in _nodes_in((args, kwargs))]
    with before.graph.inserting_before(before):
        node = before.graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with torch._guards.detect_fake_mode(inputs) or contextlib.nullcontext():
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def computed_from(start: fx.Node) -> set[fx.Node]:
    """Every node that reads ``start``, directly or through others (the output node excluded)."""
    found, stack = set(), [start]
    while stack:
        for user in stack.pop().users:
            if user.op != "output" and user not in found:
                found.add(user)
                stack.append(user)
    return found


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


# --- sizes and shapes -------------------------------------------------------------------------


def known_equal(a: Any, b: Any) -> bool:
    """Sizes (ints or symbolic) known equal without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, (int, torch.SymInt)) and statically_known_true(a == b)


def known_equal_sizes(a, b) -> bool:
    """Two size tuples of the same length, known equal dim by dim."""
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def is_full_slice(node: Any) -> bool:
    """``x[:, ..., :]`` along one dim: start 0, step 1, end at or past the dim's size (what
    ``x[:, :, None]`` traces to under dynamic shapes)."""
    if not is_op(node, aten.slice):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = args[1] or 0, args[2] or 0, args[3], args[4] or 1
    size = shape(node.args[0])[dim]
    return start == 0 and step == 1 and (end is None or end >= 2**62 or known_equal(end, size))


def undo_repeat_kv(node: Any, mutated: frozenset = frozenset()) -> Optional[fx.Node]:
    """``x`` [B, Hkv, S, D] where ``node`` is transformers' ``repeat_kv(x, n)`` (unsqueeze(2) →
    no-op slices → expand → reshape) or ``repeat_interleave(x, n, 1)``: head ``h`` reads K/V head
    ``h // n``, which GQA kernels do without the copy. None for anything else, or where a node of
    the pattern is written in place (``mutated``)."""
    if not isinstance(node, fx.Node) or node in mutated:
        return None
    if is_op(node, aten.repeat_interleave) and len(node.args) >= 3 and node.args[2] in (1, -3):
        src, repeats = node.args[0], node.args[1]
        whole = isinstance(repeats, int) or isinstance(val(repeats), torch.SymInt)  # not a tensor of counts
        return src if whole and len(shape(src) or ()) == 4 and src not in mutated else None
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view) or not is_op(node.args[0], aten.expand):
        return None
    expand = node.args[0]
    unsq, skipped = expand.args[0], []
    while is_full_slice(unsq):
        skipped.append(unsq)
        unsq = unsq.args[0]
    if not is_op(unsq, aten.unsqueeze) or set(skipped) & mutated:
        return None
    src = unsq.args[0]
    if len(shape(src) or ()) != 4 or normalize_dim(unsq.args[1], 5) != 2:
        return None
    e, out = shape(expand), shape(node)
    b, hkv, s, d = shape(src)
    if len(e) != 5 or len(out) != 4 or not known_equal_sizes((e[0], e[1], e[3], e[4], *out),
                                                             (b, hkv, s, d, b, hkv * e[2], s, d)):
        return None
    return None if {src, unsq, expand} & mutated else src
