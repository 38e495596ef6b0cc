"""Run a function on N gloo ranks in fresh processes, with a deadline: a failing rank never hangs a test.

    results = run_ranks(fn, arg, world_size=2)     # [fn(0, arg), fn(1, arg)], or RankError

``fn`` must be importable (a module-level function); it runs after ``init_process_group`` with
one CPU thread per rank. The first rank that raises ends the run: the others get ``grace_s`` to
report (a peer's death breaks their collectives), then are killed, and ``RankError`` lists what
every rank reported.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable


class RankError(RuntimeError):
    """One or more ranks raised, died or ran out of time; ``reports[rank]`` says which."""

    def __init__(self, reports: dict[int, str]):
        self.reports = reports
        super().__init__("\n".join(f"--- rank {r}: {text}" for r, text in sorted(reports.items())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, pg_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        value = fn(rank, *args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return  # no destroy_process_group: it may wait on peers that are gone
    results.put((rank, True, value))
    dist.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = 120.0,
              grace_s: float = 10.0, pg_timeout_s: float = 30.0) -> list:
    """``[fn(rank, *args) for each rank]``, each in its own process; ``RankError`` if any rank fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, pg_timeout_s), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s

    def fail(rank: int, text: str) -> None:
        nonlocal deadline
        if not errors:  # the others get grace_s to report what the failure did to them
            deadline = min(deadline, time.monotonic() + grace_s)
        errors[rank] = text

    try:
        while len(values) + len(errors) < world_size:
            now = time.monotonic()
            if now >= deadline:
                for r in range(world_size):
                    if r not in values and r not in errors:
                        errors[r] = "no report before the deadline (killed)"
                break
            try:
                rank, ok, payload = results.get(timeout=min(0.5, deadline - now))
            except queue_mod.Empty:
                for r, p in enumerate(procs):  # died without reporting (segfault, os._exit, OOM kill)
                    if r not in values and r not in errors and p.exitcode is not None and results.empty():
                        fail(r, f"exited with code {p.exitcode} without reporting")
                continue
            if ok:
                values[rank] = payload
            else:
                fail(rank, payload)
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RankError(errors)
    return [values[r] for r in range(world_size)]
