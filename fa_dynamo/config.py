"""One resolved, immutable configuration for the backend.

Resolution order (later wins): the defaults below, then ``FA_DYNAMO_*`` environment
variables, then ``torch.compile(..., options={...})`` (same keys, lower case, no prefix).
Every value is validated here, once; an invalid one raises a ``ValueError`` naming the
variable (or option) and listing what is accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

ENV_PREFIX = "FA_DYNAMO_"

KERNELS = ("auto", "cpu", "triton", "npu", "sdpa", "reference", "xformers")
INNER_COMPILERS = ("inductor", "eager")
OFFLOAD_MODES = ("off", "auto", "on")
OFFLOAD_STRATEGIES = ("auto", "host", "stream")
LOG_LEVELS = ("warning", "info", "debug")
PROCESS_VARIABLES = {"FA_DYNAMO_CPP_DECODE": ("1", "0")}
"""Variables a kernel reads once per process at its first use, not per compile (so they are not
config fields): known and validated here, read where they are used."""


@dataclass(frozen=True)
class FastAttentionConfig:
    """Every knob of the backend. Field ``x`` is set by ``FA_DYNAMO_X`` or option ``x``."""

    disable: bool = False
    """Hand the graph to the inner compiler untouched."""
    attention: bool = True
    """Run the attention pass (softmax(Q·Kᵀ)·V → fa_dynamo::attention)."""
    allreduce: bool = True
    """Run the tiling-AllReduce pass (row-parallel matmul → chunked matmul + per-chunk all_reduce)."""
    offload: str = "off"
    """CPU-offload of K/V kept in host memory: off / auto / on."""
    split_loss: bool = True
    """Compile a loss apart from the output it reads (logits → loss), so that output's unused
    gradient is not materialized as zeros in training (see ``fa_dynamo.loss_split``)."""
    lm_head_loss: bool = True
    """With split_loss: cross-entropy over a vocabulary projection gets one chunked backward with the
    projection's, no [tokens, vocab] gradient (see ``fa_dynamo.lm_head_loss``)."""
    kernel: str = "auto"
    """Attention kernel: auto picks by device; cpu / triton / npu / sdpa / reference / xformers force one."""
    inner: str = "inductor"
    """Compiler for the rest of the graph: inductor or eager (aot_autograd, no codegen)."""
    log: str = "warning"
    """Log level of the ``fa_dynamo`` logger: warning / info / debug."""
    strict: bool = False
    """A failing pass raises instead of leaving the graph unchanged (used by the tests)."""
    block_q: int = 256
    """Outer tile: query rows per unit of work in the tiled kernels."""
    block_k: int = 512
    """Inner tile: keys per tile; the granularity at which masked tiles are skipped."""
    allreduce_chunks: int = 0
    """Chunks per tiled all_reduce; 0 lets the cost model choose."""
    offload_budget_mb: int = 0
    """Device memory for one attention site's K+V under offload, in MiB; 0: no budget
    (auto offloads nothing, on keeps every host key on the host)."""
    offload_strategy: str = "auto"
    """How offloaded attention serves its host share: auto (cost model) / host (host cores) / stream (blocks to the device)."""
    offload_stage_mb: int = 0
    """Size of one host→device staging block (K and V) under offload, in MiB; 0: 32 MiB."""

    def __post_init__(self) -> None:
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("inner", self.inner, INNER_COMPILERS)
        _check_choice("offload", self.offload, OFFLOAD_MODES)
        _check_choice("log", self.log, LOG_LEVELS)
        _check_choice("offload_strategy", self.offload_strategy, OFFLOAD_STRATEGIES)
        for name, low in (("block_q", 1), ("block_k", 1), ("allreduce_chunks", 0), ("offload_budget_mb", 0), ("offload_stage_mb", 0)):
            if getattr(self, name) < low:
                raise ValueError(
                    f"{_describe(name)} must be an integer >= {low}, got {getattr(self, name)}"
                )

    def cache_key(self) -> str:
        """A stable hash of every field, for caches keyed on the configuration."""
        text = repr(sorted(dataclasses.asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()} (option '{name}')"


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{_describe(name)} = {value!r} is not valid; expected one of {', '.join(valid)}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _parse(name: str, raw: Any, kind: type) -> Any:
    """Convert an env string or option value to the field's type, with a clear error."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{_describe(name)} = {raw!r} is not valid; expected 0 or 1")
    if kind is int:
        if isinstance(raw, bool):
            raise ValueError(f"{_describe(name)} = {raw!r} is not valid; expected an integer")
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{_describe(name)} = {raw!r} is not valid; expected an integer") from None
    return str(raw).strip().lower()


_FIELD_TYPES = {f.name: {"bool": bool, "int": int, "str": str}[f.type] for f in fields(FastAttentionConfig)}


def resolve_config(
    options: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None
) -> FastAttentionConfig:
    """Defaults ← ``FA_DYNAMO_*`` environment ← ``options``; validated, frozen."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, kind in _FIELD_TYPES.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _parse(name, environ[env_name], kind)
    for env_name, valid in PROCESS_VARIABLES.items():
        if environ.get(env_name, valid[0]) not in valid:
            raise ValueError(f"{env_name} = {environ[env_name]!r} is not valid; expected one of {', '.join(valid)}")
    unknown_env = sorted(
        k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in _FIELD_TYPES
        and k not in PROCESS_VARIABLES
    )
    if unknown_env:
        raise ValueError(
            f"unknown environment variable(s) {', '.join(unknown_env)}; "
            f"known: {', '.join([ENV_PREFIX + n.upper() for n in _FIELD_TYPES] + list(PROCESS_VARIABLES))}"
        )
    for key, raw in (options or {}).items():
        name = key.lower().removeprefix(ENV_PREFIX.lower())
        if name not in _FIELD_TYPES:
            raise ValueError(f"unknown option {key!r}; known options: {', '.join(_FIELD_TYPES)}")
        values[name] = _parse(name, raw, _FIELD_TYPES[name])
    return FastAttentionConfig(**values)
