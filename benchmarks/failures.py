"""How every suite turns an exception into a recorded result instead of stopping the run.

A peer that fails on a case is a finding (out of memory, no kernel for these inputs); the
report keeps one line saying why, and the other peers go on.
"""

from __future__ import annotations

OUT_OF_MEMORY_PHRASES = ("out of memory", "can't allocate", "not enough memory")


def error_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``: enough to tell failures apart in a table."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def is_out_of_memory(e: BaseException) -> bool:
    """A host or device allocation failed (``MemoryError``, ``torch.OutOfMemoryError``, allocator text)."""
    low = str(e).lower()
    return isinstance(e, MemoryError) or any(p in low for p in OUT_OF_MEMORY_PHRASES)
