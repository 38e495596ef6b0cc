"""Tile configurations for the Triton attention kernels, per GPU architecture.

The FastAttention paper's point is that the tile shape has to follow the device: Volta and
Turing have a third (or less) of an A100's shared memory and no asynchronous copies, Hopper has
more. Each architecture gets a candidate set (outer tile ``BLOCK_M`` × inner tile ``BLOCK_N``,
pipeline stages, warps); the candidates are built by a comprehension and pruned by one named
predicate, :func:`fits_shared_memory`, against that architecture's shared-memory limit for the
call's head dims and dtype. Triton's autotuner then picks among the survivors per shape class.

Nothing here imports Triton: the tables are plain data, so they can be tested (and read) on a
machine without a GPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

KIB = 1024


@dataclass(frozen=True)
class Arch:
    """Tile candidates for one GPU architecture family."""

    name: str
    shared_memory_bytes: int  # opt-in dynamic shared memory per block (CUDA guide, "compute capabilities")
    block_m: tuple[int, ...]  # outer tile: query rows per program
    block_n: tuple[int, ...]  # inner tile: keys per loop iteration
    stages: tuple[int, ...]  # software-pipeline depth (>1 only pays with cp.async, sm80+)
    warps: tuple[int, ...]
    bf16: bool  # bf16 tensor-core dot
    async_copy: bool  # cp.async (sm80+): without it dot operands are re-laid-out through shared memory


# Shared memory per block: sm70 96 KiB, sm75 64 KiB, sm80 163 KiB, sm86/sm89 99 KiB, sm90 227 KiB.
ARCHS: dict[str, Arch] = {
    "sm70": Arch("sm70", 96 * KIB, (64, 128), (32, 64), (1, 2), (4, 8), bf16=False, async_copy=False),
    "sm75": Arch("sm75", 64 * KIB, (64, 128), (32, 64), (1, 2), (4, 8), bf16=False, async_copy=False),
    "sm80": Arch("sm80", 163 * KIB, (64, 128), (32, 64, 128), (2, 3, 4), (4, 8), bf16=True, async_copy=True),
    "sm86": Arch("sm86", 99 * KIB, (64, 128), (32, 64), (2, 3), (4, 8), bf16=True, async_copy=True),
    "sm89": Arch("sm89", 99 * KIB, (64, 128), (32, 64), (2, 3), (4, 8), bf16=True, async_copy=True),
    "sm90": Arch("sm90", 227 * KIB, (64, 128), (64, 128), (2, 3, 4), (4, 8), bf16=True, async_copy=True),
    "rocm": Arch("rocm", 64 * KIB, (64, 128), (32, 64), (1, 2), (4, 8), bf16=True, async_copy=False),
}

# The backward kernels hold more tiles live (k, v, dk, dv, plus q, dO per step): smaller blocks.
BACKWARD_BLOCKS = {"block_m": (32, 64), "block_n": (32, 64, 128)}


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    stages: int
    warps: int


@dataclass(frozen=True)
class Problem:
    """What the shared-memory estimate depends on."""

    head_dim: int  # padded (power of two)
    head_dim_v: int  # padded (power of two)
    elem_bytes: int  # q/k/v element size
    bias_bytes: int = 0  # dense bias element size, 0 without a bias
    has_mask: bool = False


def arch_for(capability: tuple[int, int], is_rocm: bool = False) -> Optional[Arch]:
    """The architecture family for a CUDA compute capability, or None below sm70."""
    if is_rocm:
        return ARCHS["rocm"]
    major, minor = capability
    if major >= 9:
        return ARCHS["sm90"]
    if major == 8:
        return ARCHS["sm80"] if minor in (0, 7) else ARCHS["sm89" if minor >= 9 else "sm86"]
    if (major, minor) >= (7, 5):
        return ARCHS["sm75"]
    if major == 7:
        return ARCHS["sm70"]
    return None


def unsupported_reason(arch: Optional[Arch], dtype_name: str) -> Optional[str]:
    """Why the Triton kernel cannot serve this architecture and dtype, or None."""
    if arch is None:
        return "Triton attention needs compute capability 7.0 or newer"
    if dtype_name == "bfloat16" and not arch.bf16:
        return f"{arch.name} has no bfloat16 tensor-core dot"
    return None


def shared_memory_bytes(cfg: TileConfig, p: Problem, backward: bool = False, async_copy: bool = True) -> int:
    """Estimate of the shared memory a config stages: operand tiles × pipeline depth.

    Forward: the Q tile once, K and V tiles per stage, and the dense bias / mask tile per stage.
    Backward (dk/dv kernel): K and V once, Q and dO per stage, bias / mask per stage. Without
    ``async_copy`` (sm70/sm75), the fp32 score tile is also re-laid-out through shared memory.
    Checked against the shared memory Triton 3.9 reports for these kernels compiled ahead of time
    for sm70–sm90: conservative on sm80+, within ~5% on sm70/sm75 (the autotuner skips any config
    that still does not fit, and the op falls back when none does).
    """
    e = p.elem_bytes
    side = cfg.block_m * cfg.block_n * (p.bias_bytes + (1 if p.has_mask else 0))
    if backward:
        resident = cfg.block_n * (p.head_dim + p.head_dim_v) * e
        per_stage = cfg.block_m * (p.head_dim + p.head_dim_v) * e + side
    else:
        resident = cfg.block_m * p.head_dim * e
        per_stage = cfg.block_n * (p.head_dim + p.head_dim_v) * e + side
    scratch = 0 if async_copy else cfg.block_m * cfg.block_n * 4
    return resident + max(cfg.stages, 1) * per_stage + scratch


def fits_shared_memory(cfg: TileConfig, p: Problem, arch: Arch, backward: bool = False) -> bool:
    """The pruning predicate: the config's staged tiles fit the architecture's shared memory."""
    return shared_memory_bytes(cfg, p, backward, arch.async_copy) <= arch.shared_memory_bytes


def candidate_configs(arch: Arch, backward: bool = False) -> list[TileConfig]:
    """Every (BLOCK_M, BLOCK_N, stages, warps) candidate for the architecture."""
    block_m = BACKWARD_BLOCKS["block_m"] if backward else arch.block_m
    block_n = BACKWARD_BLOCKS["block_n"] if backward else arch.block_n
    return [
        TileConfig(bm, bn, s, w)
        for bm, bn, s, w in itertools.product(block_m, block_n, arch.stages, arch.warps)
        if not (w == 8 and bm * bn < 64 * 64)  # 8 warps on a small tile only adds sync
    ]


def configs_for(
    arch: Arch, p: Problem, *, backward: bool = False, max_block_m: int = 1 << 30, max_block_n: int = 1 << 30
) -> list[TileConfig]:
    """Candidates that fit shared memory and the caller's tile caps; never empty.

    When nothing fits (a huge head dim on a small-memory part), the smallest candidate with one
    stage is returned: Triton then reports the resource error rather than this module guessing.
    """
    kept = [
        c
        for c in candidate_configs(arch, backward)
        if c.block_m <= max_block_m and c.block_n <= max_block_n and fits_shared_memory(c, p, arch, backward)
    ]
    if kept:
        return kept
    smallest = min(candidate_configs(arch, backward), key=lambda c: (c.block_m * c.block_n, c.stages, c.warps))
    return [TileConfig(min(smallest.block_m, 32), min(smallest.block_n, 32), 1, 4)]


def interpreter_config(block_q: int, block_k: int) -> TileConfig:
    """One fixed config for ``TRITON_INTERPRET=1``: the op's own tile sizes, as powers of two in [16, 128]."""

    def fit(n: int) -> int:
        return max(16, min(128, 1 << (max(n, 1).bit_length() - 1)))

    return TileConfig(fit(block_q), fit(block_k), 1, 4)
