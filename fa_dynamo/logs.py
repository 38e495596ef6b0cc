"""Logging as a library does it: one logger per module under ``fa_dynamo``, set to the configured
level; a stderr handler only where the application configured none, and propagation left on.
"""

from __future__ import annotations

import functools
import logging

_LEVELS = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_PACKAGE = logging.getLogger("fa_dynamo")


def configure_logging(level: str) -> None:
    """``FA_DYNAMO_LOG``: the package logger's level; a handler printing ``[logger LEVEL] message``
    to stderr only when neither the package nor the application (the root logger) has one."""
    _PACKAGE.setLevel(_LEVELS[level])
    if not _PACKAGE.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s %(levelname)s] %(message)s"))
        _PACKAGE.addHandler(handler)


@functools.lru_cache(maxsize=None)
def warn_once(log: logging.Logger, message: str) -> None:
    """A fallback or a limitation, said once per process (kernels are called per step)."""
    log.warning(message)
