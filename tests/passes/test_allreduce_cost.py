"""The tiling-AllReduce cost model: its algebra, its choices at the extremes, the chunk bounds."""

from __future__ import annotations

import pytest

from fa_dynamo.passes.allreduce import cost

PROFILES = [cost.CPU_GLOO, cost.NVLINK_H100, cost.HCCS_910B]


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_untiled_is_compute_plus_communication(p):
    m, k, n = 512, 1024, 4096
    assert cost.predict(m, k, n, 2, 8, 1, p) == pytest.approx(cost.matmul_time(m, k, n, p) + cost.allreduce_time(m * n * 2, 8, p))


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_perfect_overlap_reaches_the_pipeline_formula(p):
    p = cost.with_overrides(p, overlap=1.0)
    m, k, n, c = 4096, 1024, 8192, 4
    t_mm, t_ar = cost.matmul_time(m / c, k, n, p), cost.allreduce_time(m / c * n * 2, 8, p)
    assert cost.predict(m, k, n, 2, 8, c, p) == pytest.approx(t_mm + t_ar + (c - 1) * max(t_mm, t_ar))


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_decode_is_never_tiled(p):
    for m in (1, 4, 16):
        assert cost.choose_chunks(m, 1024, 8192, 2, 8, p) == 1


def test_no_overlap_never_tiles():
    p = cost.with_overrides(cost.NVLINK_H100, overlap=0.0)
    assert all(cost.choose_chunks(m, 3584, 8192, 2, 8, p) == 1 for m in (256, 4096, 65536))


def test_long_prefill_is_tiled_and_beats_untiled_within_the_bound():
    p = cost.NVLINK_H100
    m, k, n = 16384, 3584, 8192
    c = cost.choose_chunks(m, k, n, 2, 8, p)
    assert c > 1
    untiled, tiled = cost.predict(m, k, n, 2, 8, 1, p), cost.predict(m, k, n, 2, 8, c, p)
    assert untiled / tiled <= cost.bound(m, k, n, 2, 8, p)
    assert tiled < (1 - cost.MIN_GAIN) * untiled


def test_min_rows_to_tile_is_the_threshold():
    p, k, n = cost.NVLINK_H100, 3584, 8192
    t = cost.min_rows_to_tile(k, n, 2, 8, p)
    assert t is not None
    assert cost.choose_chunks(t, k, n, 2, 8, p) > 1 and cost.choose_chunks(t - 1, k, n, 2, 8, p) == 1


def test_single_rank_has_nothing_to_overlap():
    assert cost.choose_chunks(8192, 1024, 8192, 2, 1, cost.NVLINK_H100) == 1


@pytest.mark.parametrize("m,c", [(10, 3), (7, 7), (5, 8), (4096, 16), (37, 4)])
def test_chunk_bounds_cover_the_rows(m, c):
    bounds = cost.chunk_bounds(m, c)
    assert bounds[0][0] == 0 and bounds[-1][1] == m
    assert all(a < b for a, b in bounds) and all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and len(bounds) == min(m, c)
