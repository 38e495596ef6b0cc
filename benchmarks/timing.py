"""The one timing helper every benchmark shares, and a description of the machine.

``measure`` warms a callable up, then times ``repeats`` calls with ``time.perf_counter`` and
returns the median and every sample. ``measure_interleaved`` does the same for several
callables in round-robin order, so that a burst of background load hits all of them alike
instead of whichever happened to be running at the time.

``predict_seconds`` and ``over_budget`` let a benchmark skip a call it predicts would
take longer than its budget (scaled from the same method at a smaller size) instead of running it;
``matmul_ceiling`` measures the dense GEMM rate that GFLOP/s figures are compared with, and
``read_bandwidth`` the memory rate that decode's GB/s figures are compared with.

``CpuLoad`` reads ``/proc/stat`` around a run and reports how many cores *other* processes
kept busy meanwhile: on a small shared machine that number says how far to trust the timings.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional


@dataclass
class Timing:
    """Seconds: the median of ``samples`` (the warm-up calls are not among them)."""

    median: float
    samples: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples)

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "samples_s": self.samples,
            "warmup_s": self.warmup,
        }


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Call ``fn`` ``warmup`` times untimed-for-the-result, then ``repeats`` times timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    warm = [_once(fn) for _ in range(warmup)]
    samples = [_once(fn) for _ in range(repeats)]
    return Timing(statistics.median(samples), samples, warm)


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: Optional[float] = None,
    min_repeats: int = 3,
) -> dict[str, Timing]:
    """``measure`` for several callables, one call of each per round (same warm-up/median rule).

    With ``budget_s``, the number of timed rounds drops (never below ``min_repeats``) so that
    they take about ``budget_s`` at the pace of the last warm-up round: on a loaded machine the
    run stays bounded instead of stretching with the load.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    warm: dict[str, list[float]] = {name: [] for name in fns}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            warm[name].append(_once(fn))
    if budget_s is not None and warmup > 0:
        round_s = sum(w[-1] for w in warm.values())
        if round_s > 0:
            repeats = max(min(min_repeats, repeats), min(repeats, int(budget_s // round_s)))
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_once(fn))
    return {name: Timing(statistics.median(samples[name]), samples[name], warm[name]) for name in fns}


# --- budget: predict a call's time before running it --------------------------------------------


def predict_seconds(measured_s: float, measured_work: float, work: float) -> float:
    """A call's time at ``work`` FLOPs, scaled linearly from one measured at ``measured_work``.

    Attention at fixed heads/head dim is compute bound from a few hundred tokens on, so time
    grows with the FLOPs a method actually does; the caller picks which FLOPs (dense S² for
    methods that compute every score, only the visible ones for methods that skip tiles).
    """
    if measured_work <= 0 or measured_s < 0:
        raise ValueError(f"need a positive measured work and a non-negative time, got {measured_work}, {measured_s}")
    return measured_s * work / measured_work


def over_budget(predicted_s: Optional[float], budget_s: Optional[float]) -> Optional[str]:
    """The reason to skip a call predicted to take ``predicted_s`` under ``budget_s``; None to run it."""
    if predicted_s is None or budget_s is None or predicted_s <= budget_s:
        return None
    return f"over budget (predicted {predicted_s:.1f} s per call > {budget_s:g} s)"


# --- the machine -------------------------------------------------------------------------------


def matmul_ceiling(dtype_names: tuple[str, ...] = ("fp32", "bf16"), n: int = 2048, repeats: int = 5,
                   call_budget_s: float = 0.5) -> dict:
    """Measured GFLOP/s of one ``n×n @ n×n`` ``torch.mm`` per dtype: the machine's dense ceiling.

    Attention's two GEMMs cannot beat the machine's own large GEMM, so ``GFLOP/s / ceiling``
    says how much of the machine a method uses. Median of ``repeats`` after one warm-up. The
    size doubles from 256 up to ``n`` while one call stays under ``call_budget_s``: a CPU without
    native half-precision GEMMs takes a minute for one 2048² bfloat16 product.
    """
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = {}
    for name in dtype_names:
        g = torch.Generator().manual_seed(0)
        size = min(256, n)
        while True:
            a = torch.randn(size, size, generator=g, dtype=dtypes[name])
            b = torch.randn(size, size, generator=g, dtype=dtypes[name])
            t = measure(lambda: torch.mm(a, b), warmup=1, repeats=repeats)
            if size * 2 > n or t.median * 8 > call_budget_s:  # the next size costs ~8x
                break
            size *= 2
        out[name] = {"gflops": 2 * size**3 / t.median / 1e9, "n": size, "median_s": t.median}
    return out


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Measured GB/s of a plain ``sum`` over ``gib`` GiB of float32: the rate at which this
    machine streams memory, which a decode step (bound by reading its KV cache) is compared with.
    Make ``gib`` several times the last-level cache, or the figure is the cache's."""
    import torch

    x = torch.randn(int(gib * (1 << 30)) // 4)
    t = measure(lambda: x.sum(), warmup=1, repeats=repeats)
    return {"gbps": x.numel() * 4 / t.median / 1e9, "gib": gib, "median_s": t.median}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, core count, torch version and threads, Python, OS, date (UTC)."""
    import torch

    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe_machine(info: Optional[dict] = None) -> str:
    """One line naming the machine, e.g. for a table's caption."""
    info = info or machine_info()
    mem = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
    return (
        f"{info['cpu_model']}, {info['cores']} cores{mem}; torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}, {info['os']}; {info['date']}"
    )


def machine_caption(info: dict) -> str:
    """A shorter line for a plot's title: CPU, cores, torch and its threads, date."""
    return (f"{info['cpu_model']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads); {info['date']}")


# --- background load ---------------------------------------------------------------------------


def _proc_stat_busy() -> Optional[tuple[float, float]]:
    """(busy seconds, total seconds) summed over all cores, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields_ = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)  # idle + iowait
    total = sum(fields_[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def _own_cpu() -> float:
    """CPU seconds of this process and of its waited-for children (the memory workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuLoad:
    """``with CpuLoad() as load: ...`` then ``load.others_cores``: cores busy with other work."""

    def __enter__(self) -> "CpuLoad":
        self._stat0, self._own0, self._wall0 = _proc_stat_busy(), _own_cpu(), time.perf_counter()
        self._load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.others_cores: Optional[float] = None
        self.own_cores: Optional[float] = None
        return self

    def __exit__(self, *exc) -> None:
        stat1, own1 = _proc_stat_busy(), _own_cpu()
        wall = time.perf_counter() - self._wall0
        self.wall_s = wall
        self.loadavg_1min = (self._load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        if self._stat0 is None or stat1 is None or wall <= 0:
            return
        busy = stat1[0] - self._stat0[0]
        own = own1 - self._own0
        self.own_cores = own / wall
        self.others_cores = max(0.0, (busy - own) / wall)

    def as_dict(self) -> dict:
        return {
            "wall_s": getattr(self, "wall_s", None),
            "own_cores_avg": self.own_cores,
            "other_processes_cores_avg": self.others_cores,
            "loadavg_1min_start_end": getattr(self, "loadavg_1min", None),
        }
