"""Warnings about a bad value that may come back on every call: said once per process and key,
so a provider that repeats it fills the log with one line, not one per request."""

from __future__ import annotations

import logging
from collections.abc import Hashable

__all__ = ["warn_once"]

# (logger, message, key) triples already logged in this process.
_SAID: set[tuple[str, str, Hashable]] = set()


def warn_once(logger: logging.Logger, key: Hashable, message: str, *args: object) -> None:
    """Log ``message % args`` at WARNING, unless ``logger`` said ``message`` for ``key`` already."""
    said = (logger.name, message, key)
    if said in _SAID:
        return
    _SAID.add(said)
    logger.warning(message, *args)
