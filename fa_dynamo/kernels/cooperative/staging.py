"""Double-buffered host → device copies of a KV share, in blocks of bounded size.

``BlockStream`` walks a host-resident K/V share block by block (``block_keys`` keys each): while
the consumer attends to block ``i`` on the device, block ``i + 1`` is copied into pinned memory
by the host and uploaded on a side stream. Two slots, each one pinned host buffer and one device
buffer per tensor, are all the staging memory there is: ``4 × block bytes`` for K and V together,
whatever the share's length.

Ordering on CUDA (events per slot):

* ``copied[s]``: recorded on the side stream after the upload into slot ``s``. The compute stream
  waits on it before reading the slot; the host waits on it before refilling the slot's pinned
  buffer.
* ``freed[s]``: recorded on the compute stream after the consumer queued its work on slot ``s``.
  The side stream waits on it before overwriting the slot's device buffer.

Without CUDA (a CPU standing in for the device, as in the tests) the buffers are ordinary CPU
tensors, copies are synchronous and the event operations are no-ops: the block loop, the buffer
reuse and the memory bound run and are measured; the stream/event ordering itself only runs on
a GPU.
"""

from __future__ import annotations

from typing import Iterator

import torch


def stage_keys(k_host: torch.Tensor, v_host: torch.Tensor, stage_bytes: int) -> int:
    """Keys per block so that one block of K and V fits ``stage_bytes`` (at least one key)."""
    b, hkv = k_host.shape[:2]
    per_key = b * hkv * (k_host.shape[3] + v_host.shape[3]) * k_host.element_size()
    return max(1, stage_bytes // max(1, per_key))


class _Link:
    """The host → device link: pinned buffers, a side stream and per-slot events on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.freed = [torch.cuda.Event(), torch.cuda.Event()]

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self.cuda)

    def device_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype, device=self.device)
        if self.cuda:
            buffer.record_stream(self.stream)  # written on the side stream: no reuse before it is done
        return buffer

    def wait_host_slot(self, slot: int) -> None:
        """Block the host until the last upload from ``slot``'s pinned buffers finished."""
        if self.cuda:
            self.copied[slot].synchronize()

    def upload(self, slot: int, pairs: list) -> None:
        """Copy ``(device_dst, pinned_src)`` pairs into ``slot`` (asynchronously on CUDA)."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[slot])
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            self.copied[slot].record(self.stream)

    def wait_device_slot(self, slot: int) -> None:
        """Make the compute stream wait until the upload into ``slot`` landed."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])

    def release(self, slot: int) -> None:
        """The work queued on the compute stream so far is the last to read ``slot``."""
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream(self.device))


class BlockStream:
    """The blocks ``[(a, e), ...]`` of a host K/V share, landed on ``device`` one at a time.

    ``start()`` launches the first copy (so the caller can overlap it with other work), then
    iterating yields ``(a, k_block, v_block)``: contiguous ``[B, Hkv, e - a, D]`` views of a
    device slot, valid until the next step of the iteration.
    """

    def __init__(self, k_host: torch.Tensor, v_host: torch.Tensor, device: torch.device, block_keys: int, blocks: list):
        self.k_host, self.v_host, self.blocks = k_host, v_host, blocks
        self.link = _Link(device)
        b, hkv, _, d = k_host.shape
        dv = v_host.shape[-1]
        self.shapes = (b, hkv, d, dv)
        k_numel, v_numel = b * hkv * block_keys * d, b * hkv * block_keys * dv
        dtype = k_host.dtype
        self.pinned = [(self.link.host_buffer(k_numel, dtype), self.link.host_buffer(v_numel, dtype)) for _ in range(2)]
        self.landed = [(self.link.device_buffer(k_numel, dtype), self.link.device_buffer(v_numel, dtype)) for _ in range(2)]
        self.started = False

    def _views(self, slot_buffers, n: int):
        """The first ``n`` keys of a slot as contiguous ``[B, Hkv, n, D]`` / ``[B, Hkv, n, Dv]``."""
        b, hkv, d, dv = self.shapes
        kb, vb = slot_buffers
        return kb[: b * hkv * n * d].view(b, hkv, n, d), vb[: b * hkv * n * dv].view(b, hkv, n, dv)

    def _stage(self, i: int) -> None:
        a, e = self.blocks[i]
        slot = i % 2
        self.link.wait_host_slot(slot)
        pk, pv = self._views(self.pinned[slot], e - a)
        pk.copy_(self.k_host[:, :, a:e])
        pv.copy_(self.v_host[:, :, a:e])
        dk, dv = self._views(self.landed[slot], e - a)
        self.link.upload(slot, [(dk, pk), (dv, pv)])

    def start(self) -> None:
        if not self.started and self.blocks:
            self._stage(0)
        self.started = True

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        self.start()
        for i, (a, e) in enumerate(self.blocks):
            if i + 1 < len(self.blocks):
                self._stage(i + 1)  # in flight while block i is attended to
            slot = i % 2
            self.link.wait_device_slot(slot)
            k, v = self._views(self.landed[slot], e - a)
            yield a, k, v
            self.link.release(slot)
