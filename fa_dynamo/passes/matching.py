"""Small helpers shared by the passes: recognizing ATen ops and reading node metadata.

The passes run on pre-dispatch ATen graphs (see ``fa_dynamo.normalize``), where every spelling
of an operation has collapsed to one overload family: ``q @ k.mT``, ``torch.matmul`` and
``Tensor.matmul`` are all ``aten.matmul``; ``F.softmax`` and ``Tensor.softmax`` are
``aten.softmax.int``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten


def is_op(node: Any, *packets) -> bool:
    """True if ``node`` calls an overload of one of the given op packets (``aten.add`` ...)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return any(packet is p or target is p for p in packets)


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


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node the given nodes depend on, themselves included."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


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
