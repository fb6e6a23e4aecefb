"""What ``llmstream bench`` was asked to run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALL_SCENARIOS = (1, 2, 3, 4, 5)
# ``llmstream bench``'s arguments, by the BenchOptions field each one sets.
_ARGUMENTS = {
    "requests": "requests",
    "latency_ms": "latency_ms",
    "in_flight": "in_flight",
    "steady_seconds": "steady_seconds",
    "partitions": "partitions",
    "json_path": "json",
}


@dataclass(frozen=True)
class BenchOptions:
    """What ``llmstream bench`` was asked to run."""

    requests: int = 30_000
    latency_ms: float = 200.0
    latency_jitter: float = 0.2
    in_flight: int = 500
    # Scenario 3's load lasts this long.
    steady_seconds: float = 60.0
    partitions: int = 4
    scenarios: tuple[int, ...] = ALL_SCENARIOS
    json_path: Path | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """A smoke run: fewer requests and a shorter steady load."""
        return cls(**{"requests": 5_000, "steady_seconds": 15.0, **overrides})


def bench_options(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from ``llmstream bench``'s arguments; ``--quick`` changes the defaults."""
    overrides: dict[str, Any] = {
        name: getattr(args, arg)
        for name, arg in _ARGUMENTS.items()
        if getattr(args, arg) is not None
    }
    if args.scenarios:
        try:
            wanted = tuple(sorted({int(part) for part in args.scenarios.split(",") if part}))
        except ValueError:
            raise SystemExit(
                f"--scenarios: expected numbers like 1,2,3, got {args.scenarios!r}"
            ) from None
        if not wanted or not set(wanted) <= set(ALL_SCENARIOS):
            raise SystemExit(f"--scenarios: choose from {ALL_SCENARIOS}, got {args.scenarios!r}")
        overrides["scenarios"] = wanted
    return BenchOptions.quick(**overrides) if args.quick else BenchOptions(**overrides)
