"""How many chunks a tiled ``matmul → all_reduce`` should use: a per-chunk compute/communication model.

The untiled site runs the matmul, then the all_reduce::

    T(1) = t_mm(M) + t_ar(M)

Cut into C chunks of M/C rows, chunk i's all_reduce runs while chunk i+1 is multiplied. A
fraction ``overlap`` of the shorter of the two per-chunk times is hidden at each of the C-1
hand-overs (1.0: dedicated copy/link engines; less where the reduction steals cores from the
matmul, as on a CPU with gloo)::

    T(C) = C·t_mm(M/C) + C·t_ar(M/C) − (C−1)·overlap·min(t_mm(M/C), t_ar(M/C))

with ``t_mm(m) = launch + 2·m·K·N / flops`` and the usual α–β all-reduce cost
``t_ar(m) = latency + 2·(p−1)/p · m·N·bytes / bus_bandwidth`` (``bus_bandwidth`` is what
nccl-tests calls *busbw*). Every chunk pays ``launch`` and ``latency`` again, which is why
small M (decode) is never tiled: the model picks C = 1 unless tiling saves ``min_gain``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional


@dataclass(frozen=True)
class LinkProfile:
    """What the model needs to know about one device class and its interconnect."""

    name: str
    flops: float
    """Sustained matmul rate of one device at this size class, FLOP/s."""
    bus_bandwidth: float
    """All-reduce bus bandwidth (nccl-tests *busbw*), bytes/s."""
    latency_s: float
    """Fixed cost of one all_reduce call (α), seconds."""
    launch_s: float
    """Fixed cost of one more matmul call (kernel launch, dispatch), seconds."""
    overlap: float
    """Fraction of min(per-chunk compute, per-chunk communication) hidden per hand-over, 0..1."""
    source: str = ""
    """Where the numbers come from."""


# The 2-core CPU these tests run on: 2 gloo ranks over loopback, one thread each. FLOP rate,
# per-call overhead, latency and bandwidth are fitted to the parts timed alone by
# ``python -m benchmarks.bench_allreduce`` (benchmarks/results/allreduce_cpu.md). The overlap is
# a stand-in, not a fit: on that busy shared machine tiling measured faster at large M, but the
# fitted overlap is ~0 (smaller calls were simply cheaper per row there), so 0.5 is chosen to tile
# large communication-heavy sites and never decode.
CPU_GLOO = LinkProfile(
    name="cpu-gloo",
    flops=75e9,
    bus_bandwidth=1.25e9,
    latency_s=280e-6,
    launch_s=30e-6,
    overlap=0.5,
    source="parts fitted in benchmarks/results/allreduce_cpu.json; overlap assumed",
)

# Assumptions, not measurements: 8 devices in one node, bf16/fp16.
NVLINK_H100 = LinkProfile(
    name="8x H100 SXM, NVLink 4 / NVSwitch (NCCL)",
    flops=700e12,  # ~70% of the 989 TFLOP/s dense bf16 datasheet peak, for large GEMMs
    bus_bandwidth=460e9,  # nccl-tests all_reduce busbw at large sizes, 8x H100 SXM (published reference runs)
    latency_s=20e-6,  # small-message all_reduce latency on 8 GPUs
    launch_s=5e-6,
    overlap=0.8,  # NCCL kernels take SMs and HBM bandwidth from the GEMM
    source="assumed: datasheet peak x 0.7, published nccl-tests busbw; not measured here",
)
HCCS_910B = LinkProfile(
    name="8x Ascend 910B, HCCS full mesh (HCCL)",
    flops=220e12,  # ~70% of ~313 TFLOP/s fp16 peak
    bus_bandwidth=150e9,  # ~40% of the 7 x 56 GB/s HCCS links of one card
    latency_s=30e-6,
    launch_s=10e-6,
    overlap=0.8,
    source="assumed: datasheet peak x 0.7, HCCS link rate x 0.4; not measured here",
)

PROFILES = {"cpu": CPU_GLOO, "cuda": NVLINK_H100, "npu": HCCS_910B}

MIN_ROWS_PER_CHUNK = 16
"""Never cut chunks thinner than this many token rows."""
MAX_CHUNKS = 16
MIN_GAIN = 0.05
"""Tile only when the model predicts at least this fraction of the untiled time saved."""


def profile_for(device_type: str) -> Optional[LinkProfile]:
    """The profile for ``cpu`` / ``cuda`` / ``npu`` (None for others: the pass then needs an explicit C)."""
    return PROFILES.get(device_type)


def matmul_time(m: int, k: int, n: int, p: LinkProfile) -> float:
    return p.launch_s + 2.0 * m * k * n / p.flops


def allreduce_time(nbytes: float, world: int, p: LinkProfile) -> float:
    if world <= 1:
        return 0.0
    return p.latency_s + 2.0 * (world - 1) / world * nbytes / p.bus_bandwidth


def predict(m: int, k: int, n: int, elem_bytes: int, world: int, chunks: int, p: LinkProfile) -> float:
    """Predicted seconds for ``[m,k] @ [k,n]`` then all_reduce over ``world`` ranks, in ``chunks`` chunks."""
    rows = m / chunks
    t_mm = matmul_time(rows, k, n, p)
    t_ar = allreduce_time(rows * n * elem_bytes, world, p)
    return chunks * (t_mm + t_ar) - (chunks - 1) * p.overlap * min(t_mm, t_ar)


def candidates(m: int) -> Iterable[int]:
    """Chunk counts worth trying for ``m`` rows: 2..MAX_CHUNKS, each chunk >= MIN_ROWS_PER_CHUNK rows."""
    return range(2, min(MAX_CHUNKS, m // MIN_ROWS_PER_CHUNK) + 1)


def choose_chunks(m: int, k: int, n: int, elem_bytes: int, world: int, p: LinkProfile) -> int:
    """The chunk count with the lowest predicted time, or 1 when tiling saves less than MIN_GAIN."""
    untiled = predict(m, k, n, elem_bytes, world, 1, p)
    best, best_t = 1, untiled
    for c in candidates(m):
        t = predict(m, k, n, elem_bytes, world, c, p)
        if t < best_t:
            best, best_t = c, t
    return best if best_t <= (1.0 - MIN_GAIN) * untiled else 1


def min_rows_to_tile(k: int, n: int, elem_bytes: int, world: int, p: LinkProfile, limit: int = 1 << 22) -> Optional[int]:
    """The smallest M for which ``choose_chunks`` tiles (assumed monotone in M), or None up to ``limit``."""
    if choose_chunks(limit, k, n, elem_bytes, world, p) == 1:
        return None
    lo, hi = 1, limit  # choose(lo) == 1 < choose(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if choose_chunks(mid, k, n, elem_bytes, world, p) > 1:
            hi = mid
        else:
            lo = mid
    return hi


def bound(m: int, k: int, n: int, elem_bytes: int, world: int, p: LinkProfile) -> float:
    """The overlap bound: untiled time over max(compute, communication) — no C can beat it."""
    t_mm = matmul_time(m, k, n, p)
    t_ar = allreduce_time(m * n * elem_bytes, world, p)
    return (t_mm + t_ar) / max(t_mm, t_ar)


def with_overrides(p: LinkProfile, **fields) -> LinkProfile:
    """A copy of ``p`` with some fields replaced (benchmarks fit profiles with this)."""
    return replace(p, **fields)


def chunk_bounds(m: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` row ranges covering ``[0, m)``, sizes differing by at most one."""
    chunks = max(1, min(chunks, m))
    return [(i * m // chunks, (i + 1) * m // chunks) for i in range(chunks)]
