"""The ``fa_dynamo`` logger, set to the configured level, printing to stderr by default."""

from __future__ import annotations

import logging

log = logging.getLogger("fa_dynamo")

_LEVELS = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def configure_logging(level: str) -> None:
    log.setLevel(_LEVELS[level])
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s %(levelname)s] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
