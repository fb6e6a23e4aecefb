"""Where the bench's processes run and what they cost: CPU placement and accounting from /proc."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Placement:
    """Which CPUs the measured process gets and which the rest of the system gets."""

    worker: frozenset[int] | None
    others: frozenset[int] | None
    second_worker: frozenset[int] | None

    @classmethod
    def detect(cls) -> Placement:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux: no pinning
            return cls(None, None, None)
        if len(cpus) < 2:
            return cls(None, None, None)
        first, rest = frozenset(cpus[:1]), frozenset(cpus[1:])
        return cls(first, rest, frozenset(cpus[1:2]))

    def describe(self) -> str:
        if self.worker is None or self.others is None:
            return "not pinned (fewer than two CPUs, or no sched_setaffinity on this OS)"
        return (
            f"worker and bare loop pinned to CPU {_cpus(self.worker)}; simulator, broker, Redis "
            f"and this driver pinned to CPU {_cpus(self.others)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def total_cpu_seconds(pids: list[int]) -> float:
    """:func:`cpu_seconds` summed over ``pids``; a process that is gone counts nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all CPUs), from /proc/stat."""
    return sum(cpu_busy_seconds().values())


def cpu_busy_seconds() -> dict[int, float]:
    """CPU seconds spent on each CPU by everything on the machine, from /proc/stat."""
    busy: dict[int, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            fields = [int(x) for x in values]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy[int(name[3:])] = (sum(fields[:8]) - idle) / _CLK_TCK
    return busy


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: its peak resident set."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    """The machine the figures come from, for the report's header."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # Which build: a distribution's or an official image's is built with PGO and LTO, a
        # version manager's often not, and the worker's CPU per request differs by 7 to 13%.
        "interpreter": os.path.realpath(sys.executable),
    }
