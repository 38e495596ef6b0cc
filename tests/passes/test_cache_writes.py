"""The cache-write pass: a static KV cache's ``index_copy_`` becomes ``index_put_`` (re-inplaced by
Inductor), with the same cache contents and the same attention output as eager."""

from __future__ import annotations

import pytest
import torch

from fa_dynamo.passes.matching import op_arguments
from tests.conftest import Compiled, assert_same_as_eager

aten = torch.ops.aten


class StaticCacheStep(torch.nn.Module):
    """One decode step as transformers' ``StaticLayer.update`` writes it, then attention over the cache."""

    def __init__(self, slots: int = 48, dim: int = -2):
        super().__init__()
        self.dim = dim
        self.register_buffer("keys", torch.randn(1, 2, slots, 8))
        self.register_buffer("values", torch.randn(1, 2, slots, 8))

    def forward(self, q, k_new, v_new, position):
        self.keys.index_copy_(self.dim, position, k_new)
        self.values.index_copy_(self.dim, position, v_new)
        k, v = self.keys.repeat_interleave(2, 1), self.values.repeat_interleave(2, 1)
        hidden = torch.arange(self.keys.shape[2]) > position  # slots past this step are unfilled
        scores = (q @ k.mT * 0.3).masked_fill(hidden, float("-inf"))
        return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("dim", [2, -2])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_cache_is_written_in_place_and_read_back(dim, inner):
    eager, compiled_model = StaticCacheStep(dim=dim), StaticCacheStep(dim=dim)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = Compiled(compiled_model, {"inner": inner})
    for step in (20, 21):  # two steps: the second reads the first's write
        q, k_new, v_new = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        position = torch.tensor([step])
        assert_same_as_eager(compiled(q, k_new, v_new, position), eager(q, k_new, v_new, position))
        assert torch.equal(compiled_model.keys, eager.keys) and torch.equal(compiled_model.values, eager.values)
    (_, after), = compiled.backend.graphs
    targets = [n.target for n in after.graph.nodes]
    assert aten.index_copy_.default not in targets and targets.count(aten.index_put_.default) == 2
    (report,) = [r for r in compiled.backend.reports[0] if r.name == "cache_writes"]
    assert len(report.fused) == 2 and not report.refused
    (op,) = [n for n in after.graph.nodes if n.target is torch.ops.fa_dynamo.attention.default]
    assert op_arguments(op)["mask"] is not None  # the unfilled slots: read at run time, skipped by the kernel
