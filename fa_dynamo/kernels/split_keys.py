"""Split-K (flash-decoding) on CPU: one decode problem's keys cut across the cores.

ATen's CPU flash kernel runs one thread per (batch, head, query block). A decode step of one
sequence has few such problems — after GQA packing, one per K/V head: 8, 2, or 1 for MQA — so
on a machine with more cores than that, cores sit idle while one of them streams a whole cache.
Here each problem's keys are cut into ``splits`` equal chunks, all handed to ATen as one call
(the chunks become heads of a ``[B·H, splits, chunk, D]`` view of the cache: nothing is copied),
and the partial results are merged by their log-sum-exps. The ``L mod splits`` keys left over go
through one more small call and are merged the same way.

The rule (``key_splits``): split only when the problems leave threads idle, into enough chunks
for two per thread, each of at least ``SPLIT_MIN_KEYS`` keys (below that the merge and the
call's fixed cost outweigh the parallelism). Measured on 2 cores, 1 query × 32 heads over 1 K/V
head × 128, 32K keys: 5.9 ms unsplit, 3.5 ms in 4 chunks; with 2 or more K/V heads both cores
are already busy and nothing is split.
"""

from __future__ import annotations

from typing import Optional

import torch

from fa_dynamo.kernels.exactness import aten_lse

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

SPLIT_MIN_KEYS = 1024
"""Keys per chunk at least."""


def key_splits(problems: int, num_keys: int, threads: int) -> int:
    """Chunks per problem: 1 when ``problems`` already keep ``threads`` busy, else enough for two
    chunks per thread, each of at least ``SPLIT_MIN_KEYS`` keys."""
    if problems >= threads:
        return 1
    return max(1, min(-(-2 * threads // problems), num_keys // SPLIT_MIN_KEYS))


def _merged_heads_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of ``t``'s batch and head dims seen as one, or None where they cannot be."""
    b, h = t.shape[:2]
    if b == 1:
        return t.stride(1)
    if h == 1:
        return t.stride(0)
    return t.stride(1) if t.stride(0) == h * t.stride(1) else None


def _chunks(t: torch.Tensor, splits: int, chunk: int) -> torch.Tensor:
    """``[B, H, L, X]`` (keys on dim 2) as a ``[B·H, splits, chunk, X]`` view of its first
    ``splits · chunk`` keys."""
    return t.as_strided((t.shape[0] * t.shape[1], splits, chunk, t.shape[3]),
                        (_merged_heads_stride(t), chunk * t.stride(2), t.stride(2), t.stride(3)))


def _mask_chunks(m: torch.Tensor, splits: int, chunk: int) -> torch.Tensor:
    """``[B, H, R, L]`` (keys on dim 3) as ``[B·H, splits, R, chunk]``."""
    return m.as_strided((m.shape[0] * m.shape[1], splits, m.shape[2], chunk),
                        (_merged_heads_stride(m), chunk * m.stride(3), m.stride(2), m.stride(3)))


def _hidden_whole(given: Optional[torch.Tensor], shape: tuple[int, int, int], splits: int, chunk: int
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Bool ``[B·H, splits, R]`` and ``[B·H, 1, R]``: the rows each chunk's (and the tail's) mask
    hides whole, where ATen's lse is 0, not -inf. Reduced over the mask as given
    (``[B|1, H|1, R|1, L]``), not over its expansion to every row and head."""
    if given is None:
        return None, None
    batch, heads, rows = shape
    body = splits * chunk
    dead = torch.isneginf(given[..., :body].unflatten(-1, (splits, chunk))).all(-1)
    dead = dead.expand(batch, heads, rows, splits).reshape(batch * heads, rows, splits).transpose(1, 2)
    tail = torch.isneginf(given[..., body:]).all(-1).expand(batch, heads, rows).reshape(batch * heads, 1, rows)
    return dead, tail


def split_key_attention(q, k, v, additive: Optional[torch.Tensor], scale: Optional[float], splits: int
                        ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(out [B, H, R, Dv] in q's dtype, lse [B, H, R] float32)`` of ATen flash attention of
    ``q [B, H, R, D]`` over ``k, v [B, H, L, D]`` (views of a cache, keys on dim 2) with an
    additive mask broadcastable to ``[B, H, R, L]``, the keys cut into ``splits`` chunks; None
    where the cache's layout does not let batch and heads be seen as one dim."""
    batch, heads, rows, dim = q.shape
    num_keys = k.shape[2]
    chunk = num_keys // splits
    body = chunk * splits
    if _merged_heads_stride(k) is None or _merged_heads_stride(v) is None:
        return None
    dead, tail_dead = _hidden_whole(additive, (batch, heads, rows), splits, chunk)
    full = None
    if additive is not None:
        full = additive.expand(batch, heads, rows, num_keys)
        if _merged_heads_stride(full) is None:
            full = full.contiguous()
    chunk_q = q.reshape(batch * heads, 1, rows, dim).expand(batch * heads, splits, rows, dim)
    chunk_mask = None if full is None else _mask_chunks(full, splits, chunk)
    out, lse = _flash_cpu(chunk_q, _chunks(k, splits, chunk), _chunks(v, splits, chunk), 0.0, False,
                          attn_mask=chunk_mask, scale=scale)
    outs, lses = [out.float()], [aten_lse(lse, dead)]
    if body < num_keys:  # the L mod splits keys left over
        tail_out, tail_lse = _flash_cpu(q, k[:, :, body:], v[:, :, body:], 0.0, False,
                                        attn_mask=None if full is None else full[..., body:], scale=scale)
        outs.append(tail_out.float().reshape(batch * heads, 1, rows, -1))
        lses.append(aten_lse(tail_lse.reshape(batch * heads, 1, rows), tail_dead))
    merged, merged_lse = merge_chunks(torch.cat(outs, dim=1), torch.cat(lses, dim=1), dim=1)
    return (merged.reshape(batch, heads, rows, -1).to(q.dtype), merged_lse.reshape(batch, heads, rows))


def merge_chunks(out: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial results over disjoint key chunks (``out`` normalized per chunk, float32, chunks on
    ``dim``; ``lse`` the same shape without the value dim, -inf for a chunk a row saw nothing of)
    merged into one ``(out, lse)``; lse is -inf where no chunk saw a key, and NaN carries through."""
    top = lse.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isneginf(top), 0.0, top)
    weight = torch.exp(lse - top)
    total = weight.sum(dim=dim)
    merged = (out * weight.unsqueeze(-1)).sum(dim=dim) / torch.where(total == 0, 1.0, total).unsqueeze(-1)
    return merged, top.squeeze(dim) + torch.log(total)
