"""The printed table of ``llmstream bench``: each figure, how it is measured, and its target.

Nothing here asserts: the targets are printed beside the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llmstream.devtools.bench.measure import Figures
from llmstream.devtools.bench.options import BenchOptions
from llmstream.devtools.traffic_bench import bench_rows


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _verdict(value: float, goal: float, higher_is_better: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if higher_is_better:
        ok = value >= goal
        gap = value / goal - 1
    else:
        ok = value <= goal
        gap = goal / value - 1 if value else math.inf
    if ok:
        return "met"
    return (
        f"**missed** ({gap * 100:+.0f}%)"
        if higher_is_better
        else f"**missed** ({value / goal:.1f}x)"
    )


def _exact(value: float, goal: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "met" if value == goal else "**missed**"


@dataclass
class Table:
    """Rows of ``| scenario | figure | measured | target | verdict |`` (Markdown)."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(
        self, scenario: str, figure: str, measured: str, target: str = "", status: str = ""
    ) -> None:
        self.rows.append((scenario, figure, measured, target, status))

    def render(self) -> str:
        lines = [
            "| scenario | figure (how it is measured) | measured | target | |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _mb(value: float) -> float:
    return value / 1e6


def build_table(results: dict[str, Figures], options: BenchOptions) -> Table:
    """The rows for the scenarios in ``results`` (``s1`` ... ``s5``)."""
    t = Table()
    s1, s2, s3, s4 = (results.get(k) for k in ("s1", "s2", "s3", "s4"))
    if s1 is not None:
        name = "1 backlog drain, 1 worker"
        t.add(
            name,
            "completed requests/s (first pick-up to last response sent)",
            _n(s1["rps"]),
            "≥ 1,500",
            _verdict(s1["rps"], 1500, True),
        )
        t.add(
            name,
            "worker CPU s per 1,000 requests (utime+stime, /proc)",
            _n(s1["cpu_s_per_1000"], 3),
            "≤ 0.600",
            _verdict(s1["cpu_s_per_1000"], 0.6, False),
        )
        t.add(name, "worker core busy (CPU s / wall s)", f"{s1['worker_busy'] * 100:.0f}%")
        t.add(
            name,
            f"requests in flight, mean (of {options.in_flight} allowed)",
            _n(s1["mean_in_flight"]),
        )
        t.add(
            name,
            "worker peak RSS (VmHWM)",
            f"{_mb(s1['peak_rss_bytes']):.0f} MB",
            "< 300 MB",
            _verdict(_mb(s1["peak_rss_bytes"]), 300, False),
        )
        t.add(
            name,
            "overhead p50 / p95 / p99 ms (in worker minus provider wait; histogram)",
            f"{_n(s1['overhead_p50_ms'], 1)} / {_n(s1['overhead_p95_ms'], 1)} / "
            f"{_n(s1['overhead_p99_ms'], 1)}",
        )
        t.add(
            name,
            "end-to-end p50 / p99 ms (created_at_ms to response sent; backlog wait incl.)",
            f"{_n(s1['e2e_p50_ms'])} / {_n(s1['e2e_p99_ms'])}",
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s1["calls_per_id"], 3),
            "1.000",
            _exact(round(s1["calls_per_id"], 6), 1.0),
        )
        t.add(
            name,
            "lost requests (no response and no error)",
            _n(s1["lost"]),
            "0",
            _exact(s1["lost"], 0),
        )
        t.add(
            name,
            "simulator + broker + Redis CPU (share of one core)",
            f"{s1['others_busy'] * 100:.0f}%",
        )
        t.add(name, "provider time p50 ms as the worker saw it", _n(s1["provider_p50_ms"]))
        t.add(
            name,
            "other load during the run (other processes, kernel networking)",
            f"{s1['foreign_busy'] * 100:.0f}% of one core",
        )
    if s2 is not None:
        name = "2 bare loop (aiohttp, same core)"
        t.add(name, "requests/s (same N, same in flight, same simulator)", _n(s2["rps"]))
        t.add(name, "CPU s per 1,000 requests", _n(s2["cpu_s_per_1000"], 3))
        t.add(name, "core busy (CPU s / wall s)", f"{s2['busy'] * 100:.0f}%")
        if s1 is not None:
            rps_ratio = s1["rps"] / s2["rps"]
            cpu_ratio = s1["cpu_s_per_1000"] / s2["cpu_s_per_1000"]
            t.add(
                name,
                "pipeline / bare loop, requests/s",
                f"{rps_ratio:.2f}",
                "≥ 0.50",
                _verdict(rps_ratio, 0.5, True),
            )
            t.add(name, "pipeline / bare loop, CPU per request", f"{cpu_ratio:.1f}x")
        t.add(
            name,
            "provider calls per unique ID",
            _n(s2["calls_per_id"], 3),
            "1.000",
            _exact(round(s2["calls_per_id"], 6), 1.0),
        )
    if s3 is not None:
        name = f"3 steady load, {options.steady_seconds:.0f} s"
        t.add(name, "offered requests/s (50% of scenario 1)", _n(s3["offered_rps"]))
        t.add(
            name,
            "requests reach the worker in bursts of (median) every (median) ms",
            f"{_n(s3['burst_size'])} every {_n(s3['burst_interval_ms'])}",
        )
        t.add(
            name,
            "overhead p50 / p95 / p99 ms (histogram)",
            f"{_n(s3['overhead_p50_ms'], 1)} / {_n(s3['overhead_p95_ms'], 1)} / "
            f"{_n(s3['overhead_p99_ms'], 1)}",
            "p99 ≤ 20",
            _verdict(s3["overhead_p99_ms"], 20, False),
        )
        thirds = s3["thirds"]
        t.add(
            name,
            "overhead p99 ms by third of the window (flat?)",
            " / ".join(_n(x["p99_ms"], 1) for x in thirds),
        )
        t.add(
            name,
            "consumer lag, mean by third (produced minus group's committed offsets)",
            " / ".join(_n(x["lag_mean"]) for x in thirds),
        )
        t.add(name, "consumer lag, max", _n(s3["lag_max"]))
        t.add(
            name,
            "end-to-end p50 / p99 ms (created_at_ms to response sent)",
            f"{_n(s3['e2e_p50_ms'])} / {_n(s3['e2e_p99_ms'])}",
        )
        t.add(name, "worker CPU s per 1,000 requests", _n(s3["cpu_s_per_1000"], 3))
        t.add(
            name,
            "worker peak RSS",
            f"{_mb(s3['peak_rss_bytes']):.0f} MB",
            "< 300 MB",
            _verdict(_mb(s3["peak_rss_bytes"]), 300, False),
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s3["calls_per_id"], 3),
            "1.000",
            _exact(round(s3["calls_per_id"], 6), 1.0),
        )
        t.add(name, "lost requests", _n(s3["lost"]), "0", _exact(s3["lost"], 0))
    if s4 is not None:
        name = "4 scale-out, 2 workers"
        t.add(
            name,
            "completed requests/s (2 workers, one per CPU, sharing with the services)",
            _n(s4["rps"]),
        )
        if s1 is not None:
            t.add(name, "speed-up over scenario 1", f"{s4['rps'] / s1['rps']:.2f}x")
        t.add(name, "workers' CPU s per 1,000 requests", _n(s4["cpu_s_per_1000"], 3))
        t.add(
            name,
            "CPUs busy, each (all processes)",
            " / ".join(f"{b * 100:.0f}%" for b in s4["cpu_busy"].values()),
        )
        t.add(
            name,
            "provider time p50 ms as the workers saw it (simulator on the shared CPU)",
            _n(s4["provider_p50_ms"]),
        )
        t.add(
            name,
            "of which other load (other processes, kernel networking)",
            f"{s4['foreign_busy'] * 100:.0f}% of one core",
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s4["calls_per_id"], 3),
            "1.000",
            _exact(round(s4["calls_per_id"], 6), 1.0),
        )
        t.add(name, "lost requests", _n(s4["lost"]), "0", _exact(s4["lost"], 0))
    s5 = results.get("s5")
    if s5 is not None:
        for figure, measured, target, met in bench_rows(s5.values):
            t.add("5 traffic control", figure, measured, target, "met" if met else "**missed**")
    return t


def render_report(
    results: dict[str, Figures], options: BenchOptions, rig_info: dict[str, Any]
) -> str:
    """The header (options, machine, placement, broker) and the table."""
    m = rig_info["machine"]
    header = (
        f"llmstream bench: {options.requests:,} requests per scenario, simulator "
        f"{options.latency_ms:.0f} ms ± {options.latency_jitter * 100:.0f}%, "
        f"{options.in_flight} in flight, {options.partitions} partitions\n"
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"{m['os']}, {m['python']}\n"
        f"placement: {rig_info['placement']}\n"
        f"broker: {rig_info['broker']}\n"
    )
    return header + "\n" + build_table(results, options).render()
