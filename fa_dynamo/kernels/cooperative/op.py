"""``fa_dynamo::cooperative_attention``: attention over a KV cache split between device and host.

The paper's CPU-GPU cooperative strategy (arXiv 2410.16663). The keys/values of one call come in
two *shares*, contiguous along the key axis::

    host_first=True:   keys [0, Sh) in host memory  | keys [Sh, Sk) on the device
    host_first=False:  keys [0, Sd) on the device   | keys [Sd, Sk) in host memory

Each share is attended to separately with ``fa_dynamo::attention`` (the existing op and kernels,
nothing copied): a share covering keys ``[k0, k1)`` sees the band offsets shifted by ``k0``
(key ``j`` of the share is key ``k0 + j`` of the whole) and the key slice ``[k0, k1)`` of a dense
bias/mask. The partial results are merged exactly through their log-sum-exps (``exactness.merge_by_lse``).
The host share is served in one of two ways:

* ``host``: computed by the host cores (the CPU kernel) on a worker thread, concurrently with
  the device share; the worker's output and lse are copied to the device and merged. Only q (and
  the bias/mask slice) cross the link. Good when Sq is small (decode).
* ``stream``: copied to the device in double-buffered blocks of bounded size (two pinned host
  buffers, two device buffers, a side stream and events), each block attended to on the device as
  soon as it lands while the next one is in flight. Good when Sq is large (prefill).

``CostModel`` picks between them (host FLOP rate and memory bandwidth vs link bandwidth vs device
FLOP rate); ``strategy=`` on the op or ``overrides(strategy=...)`` forces one.

A device budget (``budget_bytes``) lets part of the host share live on the device for the call:
the host keys nearest the device share are copied to the device while the KV held there stays
within the budget, and only the overflow is served cooperatively. If all of it fits, the call is
the plain ``fa_dynamo::attention`` over the whole KV.

On a machine without an accelerator, "device" and "host" are both the CPU: the worker thread, the
LSE merge, the budget split and the streaming loop (with ordinary CPU tensors standing in for the
pinned and device buffers, synchronous copies standing in for the side stream) all run and are
tested; the CUDA stream/event ordering and pinned-memory behaviour only run on a GPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from fa_dynamo.kernels.backward import attention_backward
from fa_dynamo.kernels.exactness import fill_counts, merge_by_lse
from fa_dynamo.kernels.mask import TileKind
from fa_dynamo.kernels.ops import check_inputs
from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import compute_dtype, reference_attention, rows_of
from fa_dynamo.kernels.cooperative.staging import BlockStream, stage_keys

STRATEGIES = ("auto", "host", "stream")
DEFAULT_STAGE_BYTES = 32 << 20
"""Bytes of one staging block (its K and V together) when the caller sets none: 32 MiB."""

_attention = torch.ops.fa_dynamo.attention.default


# --- the cost model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Rough rates that decide how the host share is served (``choose_strategy``).

    The defaults describe a PCIe-attached GPU and a many-core host; set measured numbers with
    ``overrides(cost_model=CostModel(...))``.
    """

    host_gflops: float = 25.0 * (os.cpu_count() or 1)
    """Attention FLOP rate of the host cores, GFLOP/s."""
    host_mem_gbps: float = 40.0
    """Host memory bandwidth seen by the host kernel reading its KV, GB/s."""
    link_gbps: float = 20.0
    """Host → device copy bandwidth from pinned memory, GB/s."""
    device_gflops: float = 50_000.0
    """Attention FLOP rate of the device, GFLOP/s."""

    def seconds(self, *, flops_host: float, flops_device: float, kv_bytes: float, qo_bytes: float) -> dict:
        """Estimated time of each strategy for one call (device share included)."""
        t_device = flops_device / (self.device_gflops * 1e9)
        t_host = max(flops_host / (self.host_gflops * 1e9), kv_bytes / (self.host_mem_gbps * 1e9))
        t_host += qo_bytes / (self.link_gbps * 1e9)
        t_stream = max(kv_bytes / (self.link_gbps * 1e9), flops_host / (self.device_gflops * 1e9))
        return {"host": max(t_device, t_host), "stream": t_device + t_stream}


def choose_strategy(q: torch.Tensor, k_host: torch.Tensor, v_host: torch.Tensor, device_keys: int,
                    cost: Optional[CostModel] = None) -> str:
    """``"host"`` or ``"stream"`` for a host share ``k_host``/``v_host`` and ``device_keys`` keys on the device.

    With q on the CPU there is no link to stream over: always ``"host"``.
    """
    if q.device.type == "cpu":
        return "host"
    cost = cost or CostModel()
    b, hq, sq, d = q.shape
    hkv, sh, dv = k_host.shape[1], k_host.shape[2], v_host.shape[-1]
    size = q.element_size()
    seconds = cost.seconds(
        flops_host=2.0 * b * hq * sq * sh * (d + dv),
        flops_device=2.0 * b * hq * sq * device_keys * (d + dv),
        kv_bytes=float(b * hkv * sh * (d + dv) * size),
        qo_bytes=float(b * hq * sq * ((d + dv) * size + 4)),
    )
    return min(seconds, key=seconds.get)


@dataclass(frozen=True)
class _Overrides:
    strategy: Optional[str] = None
    stage_bytes: Optional[int] = None
    cost_model: Optional[CostModel] = None


_OVERRIDES: contextvars.ContextVar[_Overrides] = contextvars.ContextVar("fa_dynamo_cooperative", default=_Overrides())


@contextlib.contextmanager
def overrides(*, strategy: Optional[str] = None, stage_bytes: Optional[int] = None,
              cost_model: Optional[CostModel] = None) -> Iterator[None]:
    """Force the strategy, the staging block size or the cost model for calls made inside.

    Takes precedence over the op's own arguments (which the offload pass fixes at compile
    time), so compiled models can be steered at run time::

        with cooperative.overrides(strategy="stream", stage_bytes=64 << 20):
            model.generate(...)
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not valid; expected one of {', '.join(STRATEGIES)}")
    if stage_bytes is not None and stage_bytes < 0:
        raise ValueError(f"stage_bytes must be >= 0, got {stage_bytes}")
    current = _OVERRIDES.get()
    token = _OVERRIDES.set(replace(
        current,
        **{k: v for k, v in (("strategy", strategy), ("stage_bytes", stage_bytes), ("cost_model", cost_model)) if v is not None},
    ))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


# --- the public function ----------------------------------------------------------------------


def cooperative_attention(
    q: torch.Tensor, k_device: Optional[torch.Tensor], v_device: Optional[torch.Tensor], k_host: torch.Tensor,
    v_host: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    softcap: float = 0.0, fill: float = float("-inf"), min_offset: Optional[int] = None,
    max_offset: Optional[int] = None, host_first: bool = True, budget_bytes: int = 0, strategy: str = "auto",
    kernel: str = "auto", block_q: int = 256, block_k: int = 512, stage_bytes: int = 0, fill_added: bool = False,
) -> torch.Tensor:
    """``fa_dynamo.attention(q, cat(K), cat(V), ...)`` without gathering the KV on q's device.

    Args:
        q: ``[B, Hq, Sq, D]`` on the device.
        k_device, v_device: ``[B, Hkv, Sd, D]`` / ``[B, Hkv, Sd, Dv]`` on q's device, or None (Sd = 0).
        k_host, v_host: ``[B, Hkv, Sh, D]`` / ``[B, Hkv, Sh, Dv]`` in host (CPU) memory.
        host_first: the host keys come first (``K = cat(k_host, k_device)``), else last.
        bias, mask, scale, softcap, fill, min_offset, max_offset, kernel, block_q, block_k, fill_added: as
            ``fa_dynamo.attention``, over the whole key axis ``Sk = Sh + Sd`` (bias/mask on q's device).
        budget_bytes: bytes of K+V this call may hold on the device; host keys that fit beside the
            device share are copied over and attended to there. 0: none is copied.
        strategy: ``auto`` (the cost model), ``host`` (host cores on a worker thread) or
            ``stream`` (double-buffered blocks to the device).
        stage_bytes: bytes of one staging block (K and V) for ``stream``; 0: ``DEFAULT_STAGE_BYTES``.
            The staging memory is at most two such blocks in pinned host memory and two on the device.

    Returns:
        ``[B, Hq, Sq, Dv]`` in q's dtype: what ``fa_dynamo.attention`` returns for the whole KV.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = torch.ops.fa_dynamo.cooperative_attention(
        q, k_device, v_device, k_host, v_host, _as_4d(bias), _as_4d(mask), scale, softcap, fill,
        min_offset, max_offset, host_first, budget_bytes, strategy, kernel, block_q, block_k, stage_bytes,
        fill_added,
    )
    return out


def _as_4d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape((1,) * max(0, 4 - t.dim()) + tuple(t.shape))


def check_shares(q, k_dev, v_dev, k_host, v_host, bias, mask, strategy, kernel, block_q, block_k,
                 budget_bytes, stage_bytes) -> None:
    """Raise a ValueError describing the first problem with the shares (then ``check_inputs``)."""
    if (k_dev is None) != (v_dev is None):
        raise ValueError("k_device and v_device must both be given or both be None")
    for name, t in (("k_host", k_host), ("v_host", v_host), ("k_device", k_dev), ("v_device", v_dev)):
        if t is not None and t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if k_host.device.type != "cpu" or v_host.device.type != "cpu":
        raise ValueError(f"k_host and v_host must be in host (CPU) memory, got {k_host.device}, {v_host.device}")
    if k_host.shape[2] != v_host.shape[2]:
        raise ValueError(f"k_host {tuple(k_host.shape)} and v_host {tuple(v_host.shape)} hold different numbers of keys")
    if k_dev is not None:
        if k_dev.shape[2] != v_dev.shape[2]:
            raise ValueError(f"k_device {tuple(k_dev.shape)} and v_device {tuple(v_dev.shape)} hold different numbers of keys")
        for name, host, dev in (("k", k_host, k_dev), ("v", v_host, v_dev)):
            if (host.shape[0], host.shape[1], host.shape[3]) != (dev.shape[0], dev.shape[1], dev.shape[3]) or host.dtype != dev.dtype:
                raise ValueError(f"{name}_host {tuple(host.shape)} {host.dtype} and {name}_device "
                                 f"{tuple(dev.shape)} {dev.dtype} differ in more than the key axis")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not valid; expected one of {', '.join(STRATEGIES)}")
    if budget_bytes < 0 or stage_bytes < 0:
        raise ValueError(f"budget_bytes and stage_bytes must be >= 0, got {budget_bytes}, {stage_bytes}")
    # The whole K/V as check_inputs sees it: zero-stride views on q's device, nothing allocated.
    num_keys = k_host.shape[2] + (0 if k_dev is None else k_dev.shape[2])
    k_all = q.new_empty((1, 1, 1, 1), dtype=k_host.dtype).expand(k_host.shape[0], k_host.shape[1], num_keys, k_host.shape[3])
    v_all = q.new_empty((1, 1, 1, 1), dtype=v_host.dtype).expand(v_host.shape[0], v_host.shape[1], num_keys, v_host.shape[3])
    check_inputs(q, k_all, v_all, bias, mask, kernel, block_q, block_k)


# --- the custom op ----------------------------------------------------------------------------


@torch.library.custom_op("fa_dynamo::cooperative_attention", mutates_args=())
def _cooperative_op(
    q: torch.Tensor, k_dev: Optional[torch.Tensor], v_dev: Optional[torch.Tensor], k_host: torch.Tensor,
    v_host: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], scale: float, softcap: float,
    fill: float, min_offset: Optional[int], max_offset: Optional[int], host_first: bool, budget_bytes: int,
    strategy: str, kernel: str, block_q: int, block_k: int, stage_bytes: int, fill_added: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_shares(q, k_dev, v_dev, k_host, v_host, bias, mask, strategy, kernel, block_q, block_k, budget_bytes, stage_bytes)
    params = _Params(AttentionParams.of(scale, softcap, fill, min_offset, max_offset, block_q, block_k,
                                        fill_added=fill_added), kernel)
    out, lse = run_cooperative(q, k_dev, v_dev, k_host, v_host, bias, mask, params, host_first=host_first,
                               budget_bytes=budget_bytes, strategy=strategy, stage_bytes=stage_bytes)
    return out.contiguous(), lse.contiguous()


@_cooperative_op.register_fake
def _(q, k_dev, v_dev, k_host, v_host, bias, mask, scale, softcap, fill, min_offset, max_offset,
      host_first, budget_bytes, strategy, kernel, block_q, block_k, stage_bytes, fill_added=False):
    check_shares(q, k_dev, v_dev, k_host, v_host, bias, mask, strategy, kernel, block_q, block_k, budget_bytes, stage_bytes)
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v_host.shape[-1])
    lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    (q, k_dev, v_dev, k_host, v_host, bias, mask, scale, softcap, fill, lo, hi, host_first,
     _budget, _strategy, _kernel, block_q, block_k, _stage, fill_added) = inputs
    ctx.save_for_backward(q, k_dev, v_dev, k_host, v_host, bias, mask)
    ctx.host_first = host_first
    ctx.params = AttentionParams.of(scale, softcap, fill, lo, hi, block_q, block_k, fill_added=fill_added)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    """The backward of ``fa_dynamo::attention`` over the whole KV gathered on q's device.

    Offloading is for inference; this keeps training through an offloaded graph exact rather
    than memory-lean.
    """
    q, k_dev, v_dev, k_host, v_host, bias, mask = ctx.saved_tensors
    k = _gather(q.device, k_host, k_dev, ctx.host_first)
    v = _gather(q.device, v_host, v_dev, ctx.host_first)
    dq, dk, dv, dbias, _ = attention_backward(
        grad_out, q, k, v, bias, mask, ctx.params, needs_bias_grad=bias is not None and ctx.needs_input_grad[5]
    )
    sh = k_host.shape[2]
    sd = k.shape[2] - sh
    host_sl, dev_sl = (slice(0, sh), slice(sh, sh + sd)) if ctx.host_first else (slice(sd, sd + sh), slice(0, sd))
    dk_dev = None if k_dev is None else dk[:, :, dev_sl]
    dv_dev = None if v_dev is None else dv[:, :, dev_sl]
    dk_host, dv_host = dk[:, :, host_sl].to(k_host.device), dv[:, :, host_sl].to(v_host.device)
    return (dq, dk_dev, dv_dev, dk_host, dv_host, dbias) + (None,) * 14


_cooperative_op.register_autograd(_backward, setup_context=_setup_context)


def _gather(device, host: torch.Tensor, dev: Optional[torch.Tensor], host_first: bool) -> torch.Tensor:
    host = host.to(device)
    if dev is None:
        return host
    return torch.cat([host, dev] if host_first else [dev, host], dim=2)


# --- the implementation -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    """The arguments every share's ``fa_dynamo::attention`` call shares."""

    attention: AttentionParams  # over the whole key axis
    kernel: str

    @property
    def host_kernel(self) -> str:
        """The configured kernel if it serves CPU tensors, else the CPU kernel."""
        return self.kernel if self.kernel in ("cpu", "sdpa", "reference") else "cpu"


@dataclass(frozen=True, eq=False)
class _Share:
    """Keys ``[k0, k0 + len)`` of the whole key axis."""

    k: torch.Tensor
    v: torch.Tensor
    k0: int

    @property
    def num_keys(self) -> int:
        return self.k.shape[2]


def run_cooperative(q, k_dev, v_dev, k_host, v_host, bias, mask, params: _Params, *, host_first: bool,
                    budget_bytes: int = 0, strategy: str = "auto", stage_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] float32)`` over the whole KV (see module doc)."""
    forced = _OVERRIDES.get()
    strategy = forced.strategy or strategy
    stage_bytes = forced.stage_bytes if forced.stage_bytes is not None else stage_bytes
    host, device = _split_by_budget(q.device, k_dev, v_dev, k_host, v_host, host_first, budget_bytes)
    if host.num_keys == 0:  # the whole KV fits the budget (or there is no host key): the plain op
        whole = device if device is not None else _Share(host.k.to(q.device), host.v.to(q.device), 0)
        return _share_partial(q, whole, bias, mask, params)
    if strategy == "auto":
        strategy = choose_strategy(q, host.k, host.v, 0 if device is None else device.num_keys, forced.cost_model)
    num_q = q.shape[2]
    shares = (host, device)
    host = host if _visible(host, num_q, params) else None
    device = device if device is not None and _visible(device, num_q, params) else None
    if strategy == "host":
        parts = _host_cooperation(q, host, device, bias, mask, params)
    else:
        parts = _stream(q, host, device, bias, mask, params, stage_bytes)
    out, lse = merge_partials(parts, q.shape, v_host.shape[-1], q.dtype, q.device)
    return _recompute_fill_rows(out, lse, q, shares, bias, mask, params)


def _split_by_budget(device, k_dev, v_dev, k_host, v_host, host_first: bool, budget_bytes: int):
    """The host share and the device share after copying the host keys that fit the budget.

    The keys copied are those next to the device share, so both shares stay contiguous.
    """
    sh, sd = k_host.shape[2], 0 if k_dev is None else k_dev.shape[2]
    b, hkv = k_host.shape[:2]
    per_key = b * hkv * (k_host.shape[3] + v_host.shape[3]) * k_host.element_size()
    moved = 0 if per_key == 0 else min(sh, max(0, budget_bytes // per_key - sd))
    keep = sh - moved
    if host_first:
        host = _Share(k_host[:, :, :keep], v_host[:, :, :keep], 0)
        pieces = [(k_host[:, :, keep:], v_host[:, :, keep:])] if moved else []
        pieces += [(k_dev, v_dev)] if sd else []
        k0_dev = keep
    else:
        host = _Share(k_host[:, :, moved:], v_host[:, :, moved:], sd + moved)
        pieces = [(k_dev, v_dev)] if sd else []
        pieces += [(k_host[:, :, :moved], v_host[:, :, :moved])] if moved else []
        k0_dev = 0
    if not pieces:
        return host, None
    if len(pieces) == 1:
        k, v = pieces[0]
        return host, _Share(k.to(device), v.to(device), k0_dev)
    k = torch.cat([k.to(device) for k, _ in pieces], dim=2)
    v = torch.cat([v.to(device) for _, v in pieces], dim=2)
    return host, _Share(k, v, k0_dev)


def _visible(share: _Share, num_q: int, params: _Params) -> bool:
    """Whether the share must be attended to: some row sees one of its keys, or fill is finite
    (then hidden keys still take part, with score ``fill``, as in eager)."""
    if share.num_keys == 0 or num_q == 0:
        return False
    if math.isfinite(params.attention.fill):
        return True
    return params.attention.band.classify(0, num_q, share.k0, share.k0 + share.num_keys) is not TileKind.EMPTY


def _keys(t: Optional[torch.Tensor], k0: int, k1: int) -> Optional[torch.Tensor]:
    """The key slice ``[k0, k1)`` of a bias/mask broadcastable to ``[B, Hq, Sq, Sk]``."""
    if t is None or t.shape[-1] == 1:
        return t
    return t[..., k0:k1]


def _partial(q, k, v, k0: int, bias, mask, params: _Params, kernel: Optional[str] = None):
    """``fa_dynamo::attention`` of q over keys ``[k0, k0 + len(k))`` of the whole key axis.

    ``bias`` and ``mask`` are already that key slice (``_keys``); the band is shifted by ``k0``.
    """
    share = params.attention.replace(band=params.attention.band.shifted(k0))
    return _attention(q, k, v, bias=bias, mask=mask, kernel=kernel or params.kernel, **share.op_arguments())


def _share_partial(q, share: _Share, bias, mask, params: _Params):
    """``_partial`` over a whole share, slicing the (whole-axis) bias and mask for it."""
    k1 = share.k0 + share.num_keys
    return _partial(q, share.k, share.v, share.k0, _keys(bias, share.k0, k1), _keys(mask, share.k0, k1), params)


def merge_running(parts: list, dtype: torch.dtype):
    """Merge partial ``(out, lse)`` results over disjoint key sets into one, in the compute dtype.

    A part whose row saw no key (``lse = -inf``, out NaN) contributes nothing to that row; a row
    no part saw keeps out 0 and ``lse = -inf``. ``(None, None)`` for no parts.
    """
    acc = acc_lse = None
    ct = compute_dtype(dtype)
    for out, lse in parts:
        out = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, out.to(ct))
        acc, acc_lse = merge_by_lse(acc, acc_lse, out, lse)
    return acc, acc_lse


def merge_partials(parts: list, q_shape, dv: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of the partials, finished as ``fa_dynamo::attention`` finishes a row:
    a row that saw no key at all (every score ``-inf``) is NaN with ``lse = -inf``, as in eager."""
    acc, acc_lse = merge_running(parts, dtype)
    b, h, sq = q_shape[:3]
    if acc is None:
        return (torch.full((b, h, sq, dv), float("nan"), dtype=dtype, device=device),
                torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=device))
    acc = acc.masked_fill(torch.isneginf(acc_lse).unsqueeze(-1), float("nan"))
    return acc.to(dtype), acc_lse.float()


def _recompute_fill_rows(out, lse, q, shares, bias, mask, params: _Params):
    """Rows where a finite fill value is not negligible, recomputed exactly on the host.

    A share whose row is filled (not, or barely, seen) has ``lse ≈ fill + log(n)``; at
    ``fill = finfo.min`` float32 cannot hold the ``log(n)``, so the merge weights of such rows
    would be wrong (e.g. a fully padded query row must average V over *all* keys). Those rows —
    the ones ``fa_dynamo.attention``'s CPU kernel also recomputes — are recomputed by the
    reference over the whole KV gathered in host memory (q, bias and mask rows copied over).
    Decode rows, and every row under a ``-inf`` fill, never come here. (Same recompute as the
    CPU kernel's: ``exactness.fill_counts``.)
    """
    whole = params.attention
    if not math.isfinite(whole.fill) or (mask is None and whole.band.is_unbounded):
        return out, lse
    shares = sorted((s for s in shares if s is not None and s.num_keys), key=lambda s: s.k0)
    num_keys = sum(s.num_keys for s in shares)
    if num_keys == 0:
        return out, lse
    rows = (torch.isneginf(lse) | fill_counts(lse, whole.fill, num_keys)).flatten(0, 1).any(0).nonzero().flatten()
    if rows.numel() == 0:
        return out, lse
    cpu = torch.device("cpu")
    k = torch.cat([s.k.to(cpu) for s in shares], dim=2)
    v = torch.cat([s.v.to(cpu) for s in shares], dim=2)
    q, bias, mask, rows_h = q.to(cpu), None if bias is None else bias.to(cpu), None if mask is None else mask.to(cpu), rows.to(cpu)
    out, lse = out.clone(), lse.clone()
    for start in range(0, rows_h.numel(), whole.block_q):
        idx = rows_h[start : start + whole.block_q]
        r_out, r_lse = reference_attention(
            q.index_select(2, idx), k, v, rows_of(bias, idx), rows_of(mask, idx), whole, q_idx=idx)
        out.index_copy_(2, idx.to(out.device), r_out.to(out.device))
        lse.index_copy_(2, idx.to(out.device), r_lse.to(out.device))
    return out, lse


# --- strategy "host": the host cores on a worker thread ---------------------------------------

_WORKER: Optional[concurrent.futures.ThreadPoolExecutor] = None
_WORKER_LOCK = threading.Lock()


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one worker thread that serves host shares (created on first use)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fa_dynamo-host")
        return _WORKER


def _host_partial(q_host, share: _Share, bias_host, mask_host, params: _Params):
    """Runs on the worker thread: the host share with the CPU kernel, on host tensors only."""
    with torch.no_grad():
        return _partial(q_host, share.k, share.v, share.k0, bias_host, mask_host, params, kernel=params.host_kernel)


def _host_cooperation(q, host: Optional[_Share], device: Optional[_Share], bias, mask, params: _Params) -> list:
    """The host share on the worker thread while this thread launches the device share."""
    parts = []
    future = None
    if host is not None:
        cpu = host.k.device
        k1 = host.k0 + host.num_keys
        future = _worker().submit(
            _host_partial, q.to(cpu), host,
            None if bias is None else _keys(bias, host.k0, k1).to(cpu),
            None if mask is None else _keys(mask, host.k0, k1).to(cpu), params,
        )
    try:
        if device is not None:
            parts.append(_share_partial(q, device, bias, mask, params))
    finally:
        if future is not None:  # never leave the worker running on our tensors
            concurrent.futures.wait([future])
    if future is not None:
        try:
            out, lse = future.result()
        except Exception as e:
            raise RuntimeError(
                f"cooperative attention: the host share (keys {host.k0}..{host.k0 + host.num_keys}) "
                f"failed on the worker thread: {type(e).__name__}: {e}"
            ) from e
        parts.append((out.to(q.device), lse.to(q.device)))
    return parts


# --- strategy "stream": double-buffered blocks to the device ----------------------------------


def _stream(q, host: Optional[_Share], device: Optional[_Share], bias, mask, params: _Params, stage_bytes: int) -> list:
    """Stream the host share to q's device in double-buffered blocks; attend to each as it lands.

    Staging memory: two pinned host slots and two device slots of one block each (K and V),
    i.e. at most ``4 × stage_bytes``, whatever the host share's length (``staging.BlockStream``).
    """
    if host is None:
        return [] if device is None else [_share_partial(q, device, bias, mask, params)]
    sh = host.num_keys
    block = stage_keys(host.k, host.v, stage_bytes or DEFAULT_STAGE_BYTES)
    band = params.attention.band
    blocks = [  # blocks no query row can see are never copied (fill -inf)
        (a, min(a + block, sh)) for a in range(0, sh, block)
        if math.isfinite(params.attention.fill)
        or band.classify(0, q.shape[2], host.k0 + a, host.k0 + min(a + block, sh)) is not TileKind.EMPTY
    ]
    stream = BlockStream(host.k, host.v, q.device, block, blocks)
    stream.start()
    parts = [] if device is None else [_share_partial(q, device, bias, mask, params)]  # overlaps the first copy
    for a, k, v in stream:
        k0, k1 = host.k0 + a, host.k0 + a + k.shape[2]
        parts.append(_partial(q, k, v, k0, _keys(bias, k0, k1), _keys(mask, k0, k1), params))
        if len(parts) > 1:  # one running partial: memory O(output), not O(blocks)
            parts = [merge_running(parts, q.dtype)]
    return parts
