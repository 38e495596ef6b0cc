"""Peak resident memory of one call, measured in a forked child, and the RAM left to measure in.

A suite measures peak memory as: fork a child (``run_forked``), warm the call up there, reset
the peak-RSS mark (``reset_peak``), run the call once and take ``maxrss_mib() - rss_mib()``
from before the call. ``available_bytes`` lets a suite skip a call predicted not to fit.
"""

from __future__ import annotations

import json
import os
import resource
from typing import Callable, Optional

MiB = 1024**2


def rss_mib() -> float:
    """This process's resident set now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def maxrss_mib() -> float:
    """This process's peak resident set since it started or since ``reset_peak``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> bool:
    """Reset the peak-RSS mark to the current RSS (``clear_refs`` 5); False where the kernel refuses.

    Why: without it a call's peak would include whatever the warm-up (compiling) used.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> Optional[float]:
    """``MemAvailable`` from ``/proc/meminfo``; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_forked(fn: Callable, *args) -> dict:
    """``fn(*args)`` in a forked child; its JSON-able result comes back through a pipe.

    Why: a process started from a big parent reports the parent's peak as its own ``ru_maxrss``
    (Linux folds the old address space's high-water mark into the signal struct's ``maxrss``
    at ``execve``, and ``clear_refs`` cannot reset that). A forked child starts with a zeroed
    signal struct, so its ``ru_maxrss`` is its own. Fork from a fresh process that has run no
    parallel region, so the children start with a clean OpenMP runtime. A child that fails
    returns ``{"error": ...}``.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            import torch

            torch._dynamo.config.cache_size_limit = 64
            payload = json.dumps(fn(*args))
            code = 0
        except BaseException as e:  # report, never fall through into the parent's code
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
            code = 1
        with os.fdopen(write_fd, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if payload:
        return json.loads(payload)
    killed = " (killed: out of memory?)" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else ""
    return {"error": f"the memory worker died without a result{killed}"}
