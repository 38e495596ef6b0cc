"""The loss split under DistributedDataParallel: Dynamo's DDPOptimizer already compiles the graph
in buckets, each with its own metadata on the one tracing context, so the backend does not cut a
loss inside a bucket; gradients equal the uncompiled DDP model's on 2 gloo ranks."""

from __future__ import annotations

import torch

from tests.distributed.spawn import run_ranks


def _ddp_step(rank: int) -> tuple:
    from torch.nn.parallel import DistributedDataParallel

    from fa_dynamo import FastAttentionBackend
    from tests.test_loss_split import TinyLM, _inputs, _step

    torch.manual_seed(0)
    vocab = 4099  # 2 MiB embedding and head, 1 MiB buckets: DDPOptimizer splits the graph
    model = DistributedDataParallel(TinyLM(vocab, 128), bucket_cap_mb=1)
    ids, labels = _inputs(23, 10 + rank, vocab)
    want = _step(model, model, ids, labels)
    backend = FastAttentionBackend({"strict": True})
    got = _step(torch.compile(model, backend=backend), model, ids, labels)
    torch.testing.assert_close(got, want)
    return len(backend.reports), backend.loss_cuts


def test_ddp_buckets_are_not_cut_again():
    for graphs, cuts in run_ranks(_ddp_step, world_size=2):
        assert graphs > 1, "DDPOptimizer did not split the graph: the test would not exercise it"
        assert cuts == []
