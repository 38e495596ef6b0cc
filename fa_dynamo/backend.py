"""The ``fastattention`` torch.compile backend: config → normalize → passes → inner compiler.

    torch.compile(model, backend="fastattention", options={"kernel": "cpu"})

Rewriting happens before aot_autograd, so one pass serves inference and training: the custom
op carries its own backward, and aot_autograd traces it like any other op.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch.fx as fx

from fa_dynamo import kernels as _kernels  # noqa: F401  (registers fa_dynamo::attention)
from fa_dynamo.config import FastAttentionConfig, resolve_config
from fa_dynamo.logs import configure_logging
from fa_dynamo.normalize import to_pre_dispatch_aten
from fa_dynamo.passes.base import PassReport
from fa_dynamo.passes.manager import run_passes

log = logging.getLogger("fa_dynamo")


def inner_compile(gm: fx.GraphModule, example_inputs: list, config: FastAttentionConfig) -> Callable:
    """Compile the (rewritten) graph with the configured inner compiler."""
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("aot_eager")(gm, example_inputs)


class FastAttentionBackend:
    """A backend instance; it keeps each graph's reports (and, if asked, the graphs).

    ``torch.compile(m, backend=FastAttentionBackend({...}, keep_graphs=True))`` lets tests
    and ``fa_dynamo.explain`` see the graph before and after the passes.
    """

    def __init__(self, options: Optional[dict] = None, keep_graphs: bool = False):
        self.config = resolve_config(options)
        self.keep_graphs = keep_graphs
        self.reports: list[list[PassReport]] = []
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        config = self.config
        configure_logging(config.log)
        if config.disable:
            log.info("fa_dynamo: disabled (FA_DYNAMO_DISABLE=1); graph passed to %s untouched", config.inner)
            return inner_compile(gm, example_inputs, config)
        try:
            aten_gm = to_pre_dispatch_aten(gm)
        except Exception as e:
            if config.strict:
                raise
            log.warning("fa_dynamo: could not normalize the graph (%s: %s); compiling it unfused", type(e).__name__, e)
            return inner_compile(gm, example_inputs, config)
        before = _copy(aten_gm) if self.keep_graphs else None
        reports = run_passes(aten_gm, config)
        self.reports.append(reports)
        if self.keep_graphs:
            self.graphs.append((before, aten_gm))
        if not any(r.fused for r in reports):
            return inner_compile(gm, example_inputs, config)
        return inner_compile(aten_gm, example_inputs, config)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def fastattention(gm: fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None) -> Callable:
    """The entry point Dynamo calls: ``torch.compile(model, backend="fastattention")``."""
    return FastAttentionBackend(options)(gm, example_inputs)


def register() -> None:
    """Make ``backend="fastattention"`` resolvable after ``import fa_dynamo``.

    (Installed packages are also found without the import, through the
    ``torch_dynamo_backends`` entry point in setup.cfg.)
    """
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fastattention" not in _BACKENDS:
        register_backend(name="fastattention")(fastattention)
