"""The op-level CPU suite's peers: each a zero-argument callable on one case's q/k/v.

``build_methods`` returns what runs (eager, SDPA per backend, the op, the compiled ones after
their compiling call) and, for what cannot, the recorded reason (``NOT_APPLICABLE``, ``failure``).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa_dynamo
from benchmarks.attention_cpu_cases import COMPILED, DTYPES, Case
from benchmarks.failures import error_line, is_out_of_memory

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's ``repeat_kv``: [B, Hkv, S, D] → [B, Hkv·n_rep, S, D]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q, k, v, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """HF ``eager_attention_forward`` (inference: no dropout)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def key_keep(case: Case) -> Optional[torch.Tensor]:
    """[B, S] bool, True for real keys (HF's ``attention_mask``); None without padding."""
    if case.mask != "padding":
        return None
    keep = torch.ones(case.batch, case.seq, dtype=torch.bool)
    keep[1, case.valid_keys:] = False
    return keep


def visible(case: Case) -> Optional[torch.Tensor]:
    """[B or 1, 1, S, S] bool, True where query i sees key j; None for no mask."""
    if case.mask == "none":
        return None
    i = torch.arange(case.seq)[:, None]
    j = torch.arange(case.seq)[None, :]
    vis = j <= i
    if case.mask == "window":
        vis &= j > i - case.window
    vis = vis[None, None]
    keep = key_keep(case)
    return vis & keep[:, None, None, :] if keep is not None else vis


def make_inline(case: Case) -> Callable:
    """The eager attention with its mask built inside, for the compiled methods: ``fn(q, k, v, keep)``."""
    window = case.window

    def causal(q, k, v, keep):
        s = q.shape[-2]
        mask = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
        return eager_attention(q, k, v, mask[None, None])

    def padding(q, k, v, keep):
        s = q.shape[-2]
        mask = torch.full((s, s), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)[None, None]
        mask = mask.masked_fill(~keep[:, None, None, :], torch.finfo(q.dtype).min)
        return eager_attention(q, k, v, mask)

    def sliding(q, k, v, keep):
        s = q.shape[-2]
        i = torch.arange(s)[:, None]
        j = torch.arange(s)[None, :]
        seen = (j <= i) & (j > i - window)
        mask = torch.zeros(s, s, dtype=q.dtype).masked_fill(~seen, torch.finfo(q.dtype).min)
        return eager_attention(q, k, v, mask[None, None])

    def unmasked(q, k, v, keep):
        return eager_attention(q, k, v, None)

    return {"causal": causal, "padding": padding, "window": sliding, "none": unmasked}[case.mask]


def flex_block_mask(case: Case):
    """FlexAttention's ``BlockMask`` for the case's mask (None for no mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if case.mask == "none":
        return None
    window, keep = case.window, key_keep(case)

    def causal(b, h, qi, ki):
        return qi >= ki

    def sliding(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < window)

    def padded(b, h, qi, ki):
        return (qi >= ki) & keep[b, ki]

    mod = {"causal": causal, "window": sliding, "padding": padded}[case.mask]
    return create_block_mask(mod, case.batch if keep is not None else None, None, case.seq, case.seq, device="cpu")


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    shape_q = (case.batch, case.heads, case.seq, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq, case.head_dim)
    return tuple(torch.randn(shape, generator=g).to(dtype) for shape in (shape_q, shape_kv, shape_kv))


NOT_APPLICABLE = {
    ("sdpa", "window"): "is_causal=True cannot express a sliding window (see SDPA mask)",
    ("sdpa", "padding"): "is_causal=True cannot be combined with a padding mask (see SDPA mask)",
    ("sdpa_mask", "none"): "no mask to pass: the same call as SDPA is_causal's unmasked one",
}


def build_methods(case: Case, q, k, v, methods: tuple[str, ...]) -> tuple[dict, dict]:
    """``{method: zero-arg callable}`` and ``{method: result so far}`` (n/a or compile notes)."""
    gqa = case.kv_heads != case.heads
    keep = key_keep(case)
    needs_vis = "sdpa_mask" in methods or ("sdpa_math" in methods and case.mask in ("padding", "window"))
    vis = visible(case) if needs_vis or "eager" in methods else None  # S² bytes: only when used
    additive = None
    if "eager" in methods and vis is not None:
        dtype = DTYPES[case.dtype]
        additive = torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, torch.finfo(dtype).min)
    vis_sdpa = vis if needs_vis else None
    del vis
    fns: dict[str, Callable] = {}
    notes: dict[str, dict] = {}
    for name in methods:
        if (name, case.mask) in NOT_APPLICABLE:
            notes[name] = {"status": "n/a", "reason": NOT_APPLICABLE[(name, case.mask)]}
    if "eager" in methods:
        fns["eager"] = lambda: eager_attention(q, k, v, additive)
    causal = case.mask == "causal"
    spellings = {  # SDPA's keyword arguments per peer; is_causal wherever it can say the mask
        "sdpa": {"is_causal": causal},
        "sdpa_mask": {"attn_mask": vis_sdpa},
        "sdpa_math": {"is_causal": causal} if case.mask in ("causal", "none") else {"attn_mask": vis_sdpa},
    }
    for name, backend in (("sdpa", SDPBackend.FLASH_ATTENTION), ("sdpa_mask", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_math", SDPBackend.MATH)):
        if name in methods and name not in notes:
            fns[name] = _sdpa(q, k, v, backend, enable_gqa=gqa, **spellings[name])
    if "op" in methods:
        kw = {"max_offset": 0} if case.mask != "none" else {}
        if case.mask == "window":
            kw["min_offset"] = -(case.window - 1)
        if keep is not None:
            kw["mask"] = ~keep[:, None, None, :]
        fns["op"] = lambda: fa_dynamo.attention(q, k, v, **kw)
    torch._dynamo.reset()
    for name in COMPILED:
        if name not in methods:
            continue
        t0 = time.perf_counter()
        try:
            fn, extra = _compile(name, case, q, k, v, keep)
        except Exception as e:  # the failure is a result: recorded, the other methods go on
            notes[name] = failure(e)
            continue
        notes[name] = {"compile_s": time.perf_counter() - t0, **extra}
        fns[name] = fn
    return fns, notes


def _sdpa(q, k, v, backend: SDPBackend, **kwargs) -> Callable:
    """SDPA restricted to one backend: a backend that cannot take the call raises (recorded)."""

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return call


def _compile(name: str, case: Case, q, k, v, keep) -> tuple[Callable, dict]:
    """Compile one method and call it once (that call compiles); return the callable and notes."""
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = flex_block_mask(case)
        gqa = case.kv_heads != case.heads
        flex = torch.compile(flex_attention, dynamic=False)
        flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return (lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)), {}
    backend = fa_dynamo.FastAttentionBackend(keep_graphs=True) if name == "compiled_fa" else "inductor"
    compiled = torch.compile(make_inline(case), backend=backend, dynamic=False)
    compiled(q, k, v, keep)
    extra = {"fused": _fused(backend)} if name == "compiled_fa" else {}
    return (lambda: compiled(q, k, v, keep)), extra


def _fused(backend) -> bool:
    """Whether the attention pass put ``fa_dynamo::attention`` into the compiled graph."""
    return any(
        node.op == "call_function" and "fa_dynamo.attention" in str(node.target)
        for _, after in getattr(backend, "graphs", [])
        for node in after.graph.nodes
    )


def failure(e: BaseException) -> dict:
    """A method's exception as a result: out of memory, unsupported, or another error."""
    text = error_line(e)[:300]
    low = text.lower()
    if is_out_of_memory(e):
        return {"status": "oom", "reason": text}
    if isinstance(e, NotImplementedError) or "not supported" in low or "unsupported" in low:
        return {"status": "unsupported", "reason": text}
    return {"status": "error", "reason": text}
