"""Tensor-parallel attention block, compiled with ``fastattention``: attention → o_proj → all_reduce
is cut along the sequence, so the attention of one chunk overlaps the all_reduce of the previous.

    torchrun --nproc-per-node 2 examples/tensor_parallel_attention.py

Two spellings of one Llama-style block on gloo (CPU): Megatron-style sharded weights with
``dist.all_reduce``, and DTensor ``parallelize_module`` (ColwiseParallel / RowwiseParallel). Each
checks compiled == eager and prints what the passes did (``FA_DYNAMO_LOG=info`` prints it per
graph too).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from fa_dynamo.backend import FastAttentionBackend


class Block(torch.nn.Module):
    def __init__(self, dim=256, heads=8, hidden=512):
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        self.megatron = False  # True: the linears hold this rank's shards, reduced by hand

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + causal, dim=-1) @ v
        y = self.o(a.transpose(1, 2).reshape(b, t, -1))
        if self.megatron:
            dist.all_reduce(y)
        x = x + y
        z = self.down(F.gelu(self.up(x)))
        if self.megatron:
            dist.all_reduce(z)
        return x + z


def shard_megatron(block: Block, rank: int, world: int) -> Block:
    """q/k/v/up keep this rank's output rows, o/down its input columns."""
    with torch.no_grad():
        for name in ("q", "k", "v", "up"):
            layer = getattr(block, name)
            layer.weight = torch.nn.Parameter(layer.weight.chunk(world, 0)[rank].clone())
        for name in ("o", "down"):
            layer = getattr(block, name)
            layer.weight = torch.nn.Parameter(layer.weight.chunk(world, 1)[rank].clone())
    block.megatron = True
    return block


def run(label: str, block: Block, x: torch.Tensor) -> None:
    backend = FastAttentionBackend({"allreduce_chunks": 4, "inner": "eager"})
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    if dist.get_rank() == 0:
        print(f"{label}: compiled == eager; " + "; ".join(r.headline() for reports in backend.reports for r in reports))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x = torch.randn(2, 512, 256, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    run("megatron", shard_megatron(Block().requires_grad_(False), rank, world), x)

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    col, row = ColwiseParallel(), RowwiseParallel()
    block = parallelize_module(Block().requires_grad_(False), mesh, {"q": col, "k": col, "v": col, "o": row, "up": col, "down": row})
    run("dtensor", block, x)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
