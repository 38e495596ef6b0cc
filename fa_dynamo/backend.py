"""The ``fastattention`` torch.compile backend: config → normalize → passes → inner compiler.

    torch.compile(model, backend="fastattention", options={"kernel": "cpu"})

Rewriting happens before aot_autograd, so one pass serves inference and training: the custom
op carries its own backward, and aot_autograd traces it like any other op.

Graphs over tensor subclasses (DTensor from ``parallelize_module``) are the exception: their
collectives exist only once aot_autograd has desugared the subclasses into plain tensors, and the
pre-dispatch retrace does not accept them. For those the passes run on aot_autograd's forward
graph instead (see ``_compile_desugared``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from fa_dynamo import kernels as _kernels  # noqa: F401  (registers fa_dynamo::attention)
from fa_dynamo.config import FastAttentionConfig, resolve_config
from fa_dynamo.logs import configure_logging
from fa_dynamo.loss_split import compile_split, loss_nodes
from fa_dynamo.normalize import has_tensor_subclass, to_pre_dispatch_aten, undo_matmul_decomposition
from fa_dynamo.passes.base import PassReport
from fa_dynamo.passes.manager import run_passes
from fa_dynamo.passes.matching import describe

log = logging.getLogger(__name__)


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
        self.loss_cuts: list[tuple[str, ...]] = []  # per graph compiled in two parts: the outputs cut at

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        config = self.config
        configure_logging(config.log)
        if config.disable:
            log.info("disabled (FA_DYNAMO_DISABLE=1); graph passed to %s untouched", config.inner)
            return inner_compile(gm, example_inputs, config)
        if has_tensor_subclass(gm):
            return self._compile_desugared(gm, example_inputs)
        try:
            aten_gm = to_pre_dispatch_aten(gm)
        except Exception as e:
            if config.strict:
                raise
            log.warning("could not normalize the graph (%s: %s); compiling it unfused", type(e).__name__, e)
            return inner_compile(gm, example_inputs, config)
        rewritten = self._rewrite(aten_gm)
        if config.split_loss:
            split = self._split_loss(aten_gm, example_inputs)
            if split is not None:
                return split
        return inner_compile(aten_gm if rewritten else gm, example_inputs, config)

    def _split_loss(self, gm: fx.GraphModule, example_inputs: list) -> Optional[Callable]:
        """``gm`` compiled as model + loss (``fa_dynamo.loss_split``), or None: no loss to cut, or
        the split failed (then ``gm`` is as it was, and the log says why; strict mode raises)."""
        config, snapshot = self.config, _copy(gm)
        try:
            loss, cut_at = loss_nodes(gm, example_inputs, config.lm_head_loss)
            if not loss:
                return None
            compiled = compile_split(gm, example_inputs, loss, lambda part, inputs: inner_compile(part, inputs, config))
        except torch._dynamo.exc.RestartAnalysis:  # Dynamo's own control flow (it retraces the frame)
            raise
        except Exception as e:
            if config.strict:
                raise
            log.warning("could not compile the loss apart (%s: %s); compiling the graph whole", type(e).__name__, e)
            gm.graph = snapshot.graph
            gm.recompile()
            return None
        where = tuple(describe(n) for n in cut_at)
        self.loss_cuts.append(where)
        log.info("compiling the loss apart from %s (no zero gradient for %s)", ", ".join(where),
                 "it" if len(where) == 1 else "them")
        return compiled

    def _rewrite(self, gm: fx.GraphModule) -> bool:
        """Run the passes on ``gm`` in place, keep their reports; True if any site was rewritten."""
        before = _copy(gm) if self.keep_graphs else None
        reports = run_passes(gm, self.config)
        self.reports.append(reports)
        if self.keep_graphs:
            self.graphs.append((before, gm))
        return any(r.fused for r in reports)

    def _compile_desugared(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        """aot_autograd with the passes on its forward graph, where tensor subclasses are plain tensors.

        That graph is post-dispatch ATen (DTensor's redistributions as ``_c10d_functional``
        collectives; ``matmul`` and ``linear`` decomposed, which ``undo_matmul_decomposition``
        reverses so the passes see what they match), and the passes run after autograd: the
        forward is rewritten, the backward (training) is compiled as aot_autograd made it.
        """
        from torch._dynamo.backends.common import aot_autograd

        def forward_compiler(aot_gm: fx.GraphModule, inputs: list) -> Callable:
            undo_matmul_decomposition(aot_gm)
            self._rewrite(aot_gm)
            return _inner_compile_aten(aot_gm, inputs, self.config)

        def backward_compiler(aot_gm: fx.GraphModule, inputs: list) -> Callable:
            return _inner_compile_aten(aot_gm, inputs, self.config)

        log.debug("tensor-subclass graph; running the passes on aot_autograd's forward graph")
        return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                            keep_inference_input_mutations=True)(gm, example_inputs)


def _inner_compile_aten(gm: fx.GraphModule, example_inputs: list, config: FastAttentionConfig) -> Callable:
    """Compile an aot_autograd graph (plain ATen) with the configured inner compiler.

    Inductor expects its own decompositions applied (its aot_autograd would have), so the graph is
    retraced with them first; the passes' ops (``fa_dynamo::attention``, collectives) stay whole.
    """
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        with torch._guards.detect_fake_mode(example_inputs) or contextlib.nullcontext():
            decomposed = make_fx(gm, decomposition_table=select_decomp_table(), tracing_mode="real")(*example_inputs)
        return compile_fx_inner(decomposed, example_inputs)
    from functorch.compile import make_boxed_func

    return make_boxed_func(gm.forward)


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
