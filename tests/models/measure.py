"""Compile one corpus case and measure it: attention sites, sites fused, refusals, error to eager.

Shared by ``tests/models/test_corpus.py`` (which asserts on it) and ``benchmarks/coverage.py``
(which tabulates it)::

    case = build_case("llama", "pad_left")
    result = measure_fastattention(case)      # compiled with FastAttentionBackend, inner eager
    result.sites, result.fused, result.refused, result.max_diff
    measure_inductor(case)                    # Inductor's own fuse_attention count on the same case

A *site* is an SDPA call or a softmax over the last dim whose probabilities reach a matmul, in
a graph as the passes saw it (pre-dispatch ATen, before any rewrite): the attention the pass
should fuse.
*Fused* counts ``fa_dynamo.attention`` calls in the rewritten graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from fa_dynamo import FastAttentionBackend
from tests.models.corpus import Case

aten = torch.ops.aten
ATTENTION_OP = torch.ops.fa_dynamo.attention.default
_SOFTMAXES = (aten.softmax, aten._softmax, aten._safe_softmax)
_SDPA = (aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu)
_MATMULS = (aten.matmul, aten.bmm, aten.einsum, aten.baddbmm)
# Ops the probabilities may pass through on their way to P·V (slices: gpt-oss drops its sink column).
_PASS_THROUGH = (
    aten.dropout, aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias,
    aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.expand,
    aten.slice, aten.narrow,
)
# Softmax spellings in a Dynamo (torch-level) graph, for graphs the backend could not normalize.
_TORCH_SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch._softmax)

DEFAULT_OPTIONS = {"strict": False, "inner": "eager"}


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _reaches_matmul(node: fx.Node, depth: int = 8) -> bool:
    for user in node.users:
        if user.op != "call_function":
            continue
        if _packet(user) in _MATMULS:
            return True
        if depth and _packet(user) in _PASS_THROUGH and _reaches_matmul(user, depth - 1):
            return True
    return False


def attention_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """SDPA calls, and softmaxes over the last dim whose output reaches a matmul (through casts,
    views, slices, dropout)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and _packet(node) in _SDPA:
            sites.append(node)
            continue
        if node.op != "call_function" or _packet(node) not in _SOFTMAXES:
            continue
        x = node.args[0].meta.get("val")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if x is None or dim not in (-1, x.dim() - 1):
            continue
        if _reaches_matmul(node):
            sites.append(node)
    return sites


def site_snippet(softmax: fx.Node, max_lines: int = 48) -> str:
    """The before-graph nodes a softmax depends on, back to (and including) its Q·Kᵀ matmul.

    Covers the score chain and the mask-building nodes, in graph order, one ``format_node``
    line each with the value's shape and dtype; a matmul's q/k inputs are not followed (a
    ``baddbmm``'s added input is). Mask
    construction longer than ``max_lines`` is cut from the top (the lines nearest the softmax stay).
    """
    seen: set[fx.Node] = set()
    stack = [softmax]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call_function":
            continue
        if n is not softmax and _packet(n) in _MATMULS:
            if _packet(n) is aten.baddbmm and isinstance(n.args[0], fx.Node):
                stack.append(n.args[0])  # the added bias (BLOOM's ALiBi), not the q/k operands
            continue
        stack.extend(n.all_input_nodes)
    lines = []
    for n in softmax.graph.nodes:
        if n in seen:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                meta = f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            else:
                meta = type(v).__name__
            lines.append(f"{n.format_node()}  # {meta}")
        if n is softmax:
            break
    if len(lines) > max_lines:
        lines = [f"... {len(lines) - max_lines} earlier nodes ..."] + lines[-max_lines:]
    return "\n".join(lines)


def count_torch_softmaxes(gm: fx.GraphModule) -> int:
    """Softmaxes in a Dynamo graph (torch IR): for graphs the backend compiled without normalizing."""
    return sum(
        1 for n in gm.graph.nodes
        if (n.op == "call_function" and n.target in _TORCH_SOFTMAXES)
        or (n.op == "call_method" and n.target == "softmax")
    )


def count_fused(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION_OP)


@dataclass
class Measured:
    """One case compiled once and run once, against eager."""

    family: str
    case: str
    sites: int = 0
    fused: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (where, why), from the reports
    errors: list[str] = field(default_factory=list)  # passes that raised (non-strict: graph left unfused)
    graphs: int = 0  # graphs Dynamo handed to the backend (> 1: graph breaks)
    max_diff: float = float("nan")  # max |compiled - eager| on the valid positions
    expected: Optional[torch.Tensor] = field(default=None, repr=False)
    actual: Optional[torch.Tensor] = field(default=None, repr=False)
    valid: Optional[torch.Tensor] = field(default=None, repr=False)
    befores: list[fx.GraphModule] = field(default_factory=list, repr=False)  # pre-dispatch ATen, unrewritten
    afters: list[fx.GraphModule] = field(default_factory=list, repr=False)  # the same graphs after the passes
    snippets: dict[str, str] = field(default_factory=dict, repr=False)  # refused "where" → its before-graph snippet

    @property
    def id(self) -> str:
        return f"{self.family}-{self.case}"


class _Recording:
    """Wraps the backend to count the graphs it was handed, and those it could not normalize."""

    def __init__(self, backend: FastAttentionBackend):
        self.backend = backend
        self.graphs = 0
        self.unnormalized: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        self.graphs += 1
        before = len(self.backend.reports)
        fn = self.backend(gm, example_inputs)
        if len(self.backend.reports) == before and not self.backend.config.disable:
            self.unnormalized.append(gm)
        return fn


def _max_diff(actual: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    return (actual[valid].double() - expected[valid].double()).abs().max().item()


def eager_output(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return case.run(case.model)


def measure_fastattention(
    case: Case, options: Optional[dict] = None, expected: Optional[torch.Tensor] = None
) -> Measured:
    """Compile ``case.model`` with ``FastAttentionBackend(options)``, run the case, count and compare."""
    expected = eager_output(case) if expected is None else expected
    torch._dynamo.reset()
    backend = FastAttentionBackend(dict(DEFAULT_OPTIONS, **(options or {})), keep_graphs=True)
    recording = _Recording(backend)
    compiled = torch.compile(case.model, backend=recording)
    try:
        with torch.no_grad():
            actual = case.run(compiled)
    finally:
        torch._dynamo.reset()
    m = Measured(case.family, case.name)
    m.graphs = recording.graphs
    m.befores = [before for before, _ in backend.graphs]
    m.afters = [after for _, after in backend.graphs]
    m.sites = sum(len(attention_sites(before)) for before in m.befores)
    m.fused = sum(count_fused(after) for after in m.afters)
    m.refused = [r for reports in backend.reports for rep in reports for r in rep.refused]
    for (before, _), reports in zip(backend.graphs, backend.reports):
        nodes = {n.name: n for n in before.graph.nodes}
        for rep in reports:
            for where, _why in rep.refused:
                node = nodes.get(where.split(" ")[0])
                if node is not None:
                    m.snippets[where] = site_snippet(node)
    m.errors = [rep.error for reports in backend.reports for rep in reports if rep.error]
    for gm in recording.unnormalized:
        n = count_torch_softmaxes(gm)
        m.sites += n
        m.refused += [("(graph)", "the graph could not be normalized to pre-dispatch ATen")] * n
    m.expected, m.actual, m.valid = expected, actual, case.valid
    m.max_diff = _max_diff(actual, expected, case.valid)
    return m


@contextmanager
def _no_aot_cache():
    """AOTAutograd's cache would skip Inductor's joint-graph passes, and with them the counter."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False):
        yield


def measure_inductor(case: Case, expected: Optional[torch.Tensor] = None) -> tuple[int, float]:
    """(sites Inductor's ``fuse_attention`` rewrote, max |diff| to eager) with default ``torch.compile``."""
    from torch._dynamo.utils import counters

    expected = eager_output(case) if expected is None else expected
    torch._dynamo.reset()
    counters.clear()
    try:
        with _no_aot_cache(), torch.no_grad():
            actual = case.run(torch.compile(case.model))
        fused = counters["inductor"]["fuse_attention"]
    finally:
        torch._dynamo.reset()
    return fused, _max_diff(actual, expected, case.valid)
