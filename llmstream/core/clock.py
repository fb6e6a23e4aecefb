"""The one wall clock: milliseconds since the epoch, as events write time (``created_at_ms``,
``deadline_ms``, ``completed_at_ms``).

Code that needs a different clock in a test takes a ``Callable[[], int]`` argument defaulting to
:func:`wall_clock_ms`; nothing patches this module.
"""

from __future__ import annotations

import time

__all__ = ["wall_clock_ms"]


def wall_clock_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000
