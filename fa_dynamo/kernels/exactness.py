"""What keeps every fast kernel exact: the log-sum-exp merge, the rows a kernel cannot serve, and
their recompute by the reference.

A fast kernel drops masked scores and reports the log-sum-exp of what it saw. That is the
reference's answer for almost every row; the exceptions are found from the lse and the output,
never from the Sq×Sk scores:

* rows that see no key (eager gives NaN for ``-inf`` fills, a uniform average for finite ones);
* rows where a finite fill value is not negligible next to what the row saw;
* rows whose lse is so large (a ``-1e9`` bias hiding the row) that float32 lost ``log(n)`` beside
  it, so merging partial results by it would be wrong;
* NaN: the reference's NaN comes from a NaN query, key, bias or slope the row sees, or from a NaN
  or infinite value at *any* key of the call, hidden or not (``0 · NaN`` and ``0 · inf`` in
  ``softmax · V``), or from an infinite key a ``fill_added`` row hides (``inf + fill``). ATen's CPU
  flash kernel propagates every NaN it reads, except in a row whose every score is NaN (a NaN
  query row, a NaN key the row alone sees): its scalar max skips NaN, the row looks empty and
  comes back as zeros with lse 0 (both tested in ``tests/kernels/test_exactness.py``;
  ``aten_lse`` turns that 0 into NaN). So a CPU path checks its output, its lse and only the
  values of keys it did not read, as does Triton's packed decode call (``triton/forward.py``). A
  kernel whose NaN behaviour is not known (the other device kernels) checks every input whole.

Those rows are recomputed by ``reference_attention``, ``block_q`` rows at a time.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fa_dynamo.kernels.params import AttentionParams
from fa_dynamo.kernels.reference import reference_attention, rows_of

NEGLIGIBLE_LOG = -110.0
"""exp(x) is exactly 0 in float32 below this: a masked score this far under the row's log-sum-exp
contributes nothing, whether it was filled with -inf or with a finite value."""

HUGE_LSE = 1e6
"""Beyond this magnitude a float32 lse holds log-counts to worse than 0.06 (ulp 2^-4 at 1e6):
merging partial results by it would weigh a run of tied keys (scores of -1e9 + s, which float32
rounds to one value) as one key. Such rows are recomputed whole by the reference."""

ALL_KEYS = None
"""``unread_keys`` for a kernel whose NaN propagation is not known: every input is checked."""


def merge_by_lse(
    acc: Optional[torch.Tensor], lse: Optional[torch.Tensor], out: torch.Tensor, seg_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax results (``out`` normalized, compute dtype) by their lse."""
    if acc is None:
        return out, seg_lse
    new_lse = torch.logaddexp(lse, seg_lse)
    safe = torch.where(torch.isneginf(new_lse), 0.0, new_lse)
    w_old = torch.exp(lse - safe).unsqueeze(-1)
    w_new = torch.exp(seg_lse - safe).unsqueeze(-1)
    return acc * w_old + out * w_new, new_lse


def aten_lse(lse: torch.Tensor, dead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ATen's CPU flash lse (float32) with its two zeros told apart: ``dead`` rows (the mask
    hides them whole) get -inf; any other row it reports as 0 gets NaN, so ``unserved_rows``
    recomputes it — ATen answers 0 for a row whose every score is NaN (see module doc), and a
    finite row whose lse is exactly 0 only costs a needless recompute."""
    lse = lse.float()
    lse = lse.masked_fill(lse == 0, float("nan"))
    return lse if dead is None else lse.masked_fill(dead, float("-inf"))


def fill_counts(lse: torch.Tensor, fill: float, num_keys: int) -> torch.Tensor:
    """Bool: rows where ``num_keys`` scores of the finite ``fill`` are not negligible next to the
    row's lse. Written as a float64 difference, which stays exact at ``|fill| ~ 1e38`` where
    ``lse ≈ fill`` and a sum would lose the ``log(n)``."""
    return (lse.double() - fill) < math.log(max(num_keys, 1)) - NEGLIGIBLE_LOG


def unserved_rows(lse: torch.Tensor, mask: Optional[torch.Tensor], params: AttentionParams, num_keys: int
                  ) -> torch.Tensor:
    """Bool ``[B, H, Sq]``: rows a fast kernel (masked scores dropped, ``lse`` from what it saw)
    cannot serve exactly — no visible key, a finite fill value that is not negligible, an lse so
    large (a -1e9 or finfo.min bias hiding the whole row) that float32 lost log(n) next to it and
    merging partial results by it would be wrong, or a NaN lse (ATen's causal CPU kernel with
    ``scale=0`` computes -inf · 0)."""
    unserved = torch.isneginf(lse) | torch.isnan(lse) | (lse.abs() > HUGE_LSE)
    if math.isfinite(params.fill) and (mask is not None or params.is_masked):
        unserved |= fill_counts(lse, params.fill, num_keys)
    return unserved


def _partial_sums(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over its last two dims: for a slice of a cache (``[B, H, keys, D]``) each
    head's block is contiguous, and this reads it at ~44 GB/s on 2 cores where one reduction over
    the strided view reads at ~36 (both measured on 64 MiB slices)."""
    return t.sum(dim=(-2, -1)) if t.dim() >= 2 else t.sum()


def has_nan(t: Optional[torch.Tensor]) -> bool:
    """One plain reduction (a NaN survives a sum; inf - inf only costs the exact check after it):
    ~30x cheaper than ``isnan().any()``, which materializes a bool tensor of the input's size."""
    return t is not None and t.numel() > 0 and bool(_partial_sums(t).isnan().any())


def rows_with_nan(t: torch.Tensor) -> torch.Tensor:
    """Bool ``t.shape[:-1]``: the rows of ``t`` that may hold a NaN, by each row's sum (a NaN
    survives it; a row holding both infinities is a false alarm, which costs only the exact
    recompute callers make of these rows). ~10x cheaper than ``t.isnan().any(-1)``."""
    return t.sum(dim=-1).isnan()


def has_nonfinite(t: Optional[torch.Tensor]) -> bool:
    """``has_nan`` for inputs where an infinity matters as much as a NaN (values a kernel did not
    read: eager multiplies them by 0). A finite sum that overflows only costs the exact recompute."""
    return t is not None and t.numel() > 0 and not bool(_partial_sums(t).isfinite().all())


def nan_rows(out, q, k, v, bias, params: AttentionParams,
             unread_keys: Optional[Sequence[tuple[int, int]]] = ALL_KEYS,
             biased_keys: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Bool ``[B, H, Sq]``: rows where the reference may give NaN and the kernel's output may not.

    With ``unread_keys`` (the key ranges ``[k0, k1)`` some row was not handed: skipped tiles,
    keys outside the band's range) the kernel propagates every NaN it read, so the candidates are
    the rows its output has NaN in, and every row when a value it did not read is NaN or
    infinite, or a key of ``biased_keys`` (keys left out because a ``-inf`` bias hides them: unlike a mask, which
    replaces the score, a bias adds to it, so a NaN key there is a NaN score). With ``ALL_KEYS``
    a NaN in a query row marks that row, and one anywhere in the bias or the ALiBi slopes, or a
    NaN or an infinity anywhere in K or V, marks every row (the reference decides which rows see it)."""
    if unread_keys is not ALL_KEYS:
        if params.fill_added:  # the fill is added to a hidden score: a NaN key there is a NaN score
            biased_keys = [*biased_keys, *unread_keys]
        rows = rows_with_nan(out)
        if (any(has_nonfinite(v[:, :, k0:k1]) for k0, k1 in unread_keys if k1 > k0)
                or any(has_nonfinite(k[:, :, k0:k1]) for k0, k1 in biased_keys if k1 > k0)):
            rows = torch.ones_like(rows)
        return rows
    rows = q.isnan().any(dim=-1) if has_nan(q) else q.new_zeros(q.shape[:-1], dtype=torch.bool)
    alibi = params.alibi
    if has_nonfinite(k) or has_nonfinite(v) or has_nan(bias) or (alibi is not None and has_nan(alibi.slopes)):
        rows = torch.ones_like(rows)
    return rows


def recompute_unserved_rows(out, lse, q, k, v, bias, mask, params: AttentionParams,
                            settled: Optional[torch.Tensor] = None,
                            unread_keys: Optional[Sequence[tuple[int, int]]] = ALL_KEYS,
                            biased_keys: Sequence[tuple[int, int]] = ()) -> None:
    """Overwrite, with the reference, the rows the kernel could not serve (in place): those of
    ``unserved_rows`` and ``nan_rows``; ``settled`` rows (``[B, H, Sq]``) are already exact."""
    unserved = unserved_rows(lse, mask, params, k.shape[2]) | nan_rows(
        out, q, k, v, bias, params, unread_keys, biased_keys)
    if settled is not None:
        unserved &= ~settled
    rows = unserved.any(dim=0).any(dim=0).nonzero().flatten()
    for start in range(0, rows.numel(), params.block_q):
        idx = rows[start : start + params.block_q]
        r_out, r_lse = reference_attention(
            q.index_select(2, idx), k, v, rows_of(bias, idx), rows_of(mask, idx), params.rows(idx), q_idx=idx,
        )
        out.index_copy_(2, idx, r_out)
        lse.index_copy_(2, idx, r_lse)
