"""The C++ decode kernel (``csrc/decode_attention.cpp``): built on first use, ATen's kernel otherwise.

Decode on CPU does ~1 multiply-add per byte of K/V it reads, so a core must run its inner loop as
vector code end to end to be bound by memory; ATen's CPU flash kernel (built for long query
blocks) reads K/V at ~11-12 GB/s on such calls on 2 cores here, this kernel at ~20-27 (see the module
doc of the source). It is compiled for the machine it runs on (``-march=native``) by
``torch.utils.cpp_extension.load`` the first time a process needs it (~12 s, then cached in
``TORCH_EXTENSIONS_DIR``, keyed by the CPU's flags so a shared home serves different machines),
and registers ``torch.ops.fa_dynamo_cpp.decode_attention``. Where it cannot be built (no C++
compiler, ``FA_DYNAMO_CPP_DECODE=0``) the packed path uses ATen's kernel, said once in the log.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from fa_dynamo.logs import warn_once

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
MAX_ROWS = 16
"""Rows per K/V head the kernel takes (``MAX_ROWS`` in the source): beyond this a row's share of
the K/V read stops dominating and ATen's blocked kernel is as fast."""
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
"""Query and value head dims the kernel is instantiated for."""
DTYPES = (torch.float32, torch.bfloat16)
"""K/V element types (the query, the mask and all arithmetic are float32)."""


def _cpu_signature() -> str:
    """The CPU's model and flags: a kernel built with ``-march=native`` runs only where they match."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(line for line in info.splitlines() if line.startswith(("flags", "model name")))[:4096]
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@functools.cache
def decode_kernel_available() -> bool:
    """Build (or load the cached build of) the kernel once per process; False where it cannot be."""
    if os.environ.get("FA_DYNAMO_CPP_DECODE", "1") == "0":
        log.info("C++ decode kernel off (FA_DYNAMO_CPP_DECODE=0): decode uses ATen's flash kernel")
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name=f"fa_dynamo_decode_{_cpu_signature()}", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, a toolchain that rejects the flags
        warn_once(log, f"C++ decode kernel unavailable ({type(err).__name__}: {str(err).strip()[:300]}); "
                       "decode uses ATen's flash kernel (set FA_DYNAMO_CPP_DECODE=0 to skip the build)")
        return False
    log.info("C++ decode kernel loaded from %s", SOURCE.name)
    return True


def decode_kernel_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> bool:
    """Whether a packed call (``rows`` per K/V head) is one the kernel takes: float32 or bfloat16,
    head dims it is built for, K/V contiguous in the head dim, at most ``MAX_ROWS`` rows."""
    return (q.dtype == k.dtype == v.dtype and q.dtype in DTYPES and rows <= MAX_ROWS
            and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS
            and k.stride(-1) == 1 and v.stride(-1) == 1 and decode_kernel_available())


def decode_attention(q, k, v, additive: Optional[torch.Tensor], scale: float, splits: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, R, Dv] in q's dtype, lse [B, H, R] float32)`` of ``q [B, H, R, D]`` over
    ``k, v [B, H, L, D]`` with an additive mask broadcastable to ``[B, H, R, L]``, each problem's
    keys cut into ``splits`` chunks merged by log-sum-exp, computed in float32; lse is -inf where a
    row saw no key, and NaN propagates as in eager over the keys read."""
    if additive is not None and additive.is_floating_point():
        additive = additive.float()
    out, lse = torch.ops.fa_dynamo_cpp.decode_attention(q, k, v, additive, scale, splits)
    return out.to(q.dtype), lse
