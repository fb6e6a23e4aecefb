"""The printed table of ``llmstream bench``: each figure, how it is measured, and its target.

Nothing here asserts: the targets are printed beside the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llmstream.devtools.bench.measure import Figures
from llmstream.devtools.bench.options import BenchOptions


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


def _ms3(f: Figures, what: str) -> str:
    """``p50 / p95 / p99`` of the ``overhead`` figures, one decimal."""
    return " / ".join(_n(f[f"{what}_p{q}_ms"], 1) for q in (50, 95, 99))


@dataclass
class _Scenario:
    """The rows of one scenario: ``add`` and the rows several scenarios print alike."""

    table: Table
    name: str
    f: Figures

    def add(self, figure: str, measured: str, target: str = "", status: str = "") -> None:
        self.table.add(self.name, figure, measured, target, status)

    def peak_rss(self, figure: str) -> None:
        rss = _mb(self.f["peak_rss_bytes"])
        self.add(figure, f"{rss:.0f} MB", "< 300 MB", _verdict(rss, 300, False))

    def calls_per_id(self) -> None:
        per_id = self.f["calls_per_id"]
        self.add(
            "provider calls per unique ID", _n(per_id, 3), "1.000", _exact(round(per_id, 6), 1)
        )

    def lost(self, figure: str = "lost requests") -> None:
        self.add(figure, _n(self.f["lost"]), "0", _exact(self.f["lost"], 0))


def _drain(row: _Scenario, options: BenchOptions) -> None:
    f = row.f
    row.add(
        "completed requests/s (first pick-up to last response sent)",
        _n(f["rps"]),
        "≥ 1,500",
        _verdict(f["rps"], 1500, True),
    )
    row.add(
        "worker CPU s per 1,000 requests (utime+stime, /proc)",
        _n(f["cpu_s_per_1000"], 3),
        "≤ 0.500",
        _verdict(f["cpu_s_per_1000"], 0.5, False),
    )
    row.add("worker core busy (CPU s / wall s)", f"{f['worker_busy'] * 100:.0f}%")
    row.add(f"requests in flight, mean (of {options.in_flight} allowed)", _n(f["mean_in_flight"]))
    row.peak_rss("worker peak RSS (VmHWM)")
    row.add(
        "overhead p50 / p95 / p99 ms (in worker minus provider wait; histogram)",
        _ms3(f, "overhead"),
    )
    row.add(
        "end-to-end p50 / p99 ms (created_at_ms to response sent; backlog wait incl.)",
        f"{_n(f['e2e_p50_ms'])} / {_n(f['e2e_p99_ms'])}",
    )
    row.calls_per_id()
    row.lost("lost requests (no response and no error)")
    row.add("simulator + broker + Redis CPU (share of one core)", f"{f['others_busy'] * 100:.0f}%")
    row.add("provider time p50 ms as the worker saw it", _n(f["provider_p50_ms"]))
    row.add(
        "other load during the run (other processes, kernel networking)",
        f"{f['foreign_busy'] * 100:.0f}% of one core",
    )


def _bare_loop(row: _Scenario, s1: Figures | None) -> None:
    f = row.f
    row.add("requests/s (same N, same in flight, same simulator)", _n(f["rps"]))
    row.add("CPU s per 1,000 requests", _n(f["cpu_s_per_1000"], 3))
    row.add("core busy (CPU s / wall s)", f"{f['busy'] * 100:.0f}%")
    if s1 is not None:
        rps_ratio = s1["rps"] / f["rps"]
        cpu_ratio = s1["cpu_s_per_1000"] / f["cpu_s_per_1000"]
        row.add(
            "pipeline / bare loop, requests/s",
            f"{rps_ratio:.2f}",
            "≥ 0.70",
            _verdict(rps_ratio, 0.7, True),
        )
        row.add(
            "pipeline / bare loop, CPU per request",
            f"{cpu_ratio:.1f}x",
            "≤ 1.8x",
            _verdict(cpu_ratio, 1.8, False),
        )
    row.calls_per_id()


def _steady(row: _Scenario) -> None:
    f = row.f
    row.add("offered requests/s (50% of scenario 1)", _n(f["offered_rps"]))
    row.add(
        "requests reach the worker in bursts of (median) every (median) ms",
        f"{_n(f['burst_size'])} every {_n(f['burst_interval_ms'])}",
    )
    row.add(
        "overhead p50 / p95 / p99 ms (histogram)",
        _ms3(f, "overhead"),
        "p99 ≤ 20",
        _verdict(f["overhead_p99_ms"], 20, False),
    )
    thirds = f["thirds"]
    row.add(
        "overhead p99 ms by third of the window (flat?)",
        " / ".join(_n(x["p99_ms"], 1) for x in thirds),
    )
    row.add(
        "consumer lag, mean by third (produced minus group's committed offsets)",
        " / ".join(_n(x["lag_mean"]) for x in thirds),
    )
    row.add("consumer lag, max", _n(f["lag_max"]))
    row.add(
        "end-to-end p50 / p99 ms (created_at_ms to response sent)",
        f"{_n(f['e2e_p50_ms'])} / {_n(f['e2e_p99_ms'])}",
    )
    row.add("worker CPU s per 1,000 requests", _n(f["cpu_s_per_1000"], 3))
    row.peak_rss("worker peak RSS")
    row.calls_per_id()
    row.lost()


def _scale_out(row: _Scenario, s1: Figures | None) -> None:
    f = row.f
    row.add(
        "completed requests/s (2 workers, one per CPU, sharing with the services)", _n(f["rps"])
    )
    if s1 is not None:
        row.add("speed-up over scenario 1", f"{f['rps'] / s1['rps']:.2f}x")
    row.add("workers' CPU s per 1,000 requests", _n(f["cpu_s_per_1000"], 3))
    row.add(
        "CPUs busy, each (all processes)",
        " / ".join(f"{b * 100:.0f}%" for b in f["cpu_busy"].values()),
    )
    row.add(
        "provider time p50 ms as the workers saw it (simulator on the shared CPU)",
        _n(f["provider_p50_ms"]),
    )
    row.add(
        "of which other load (other processes, kernel networking)",
        f"{f['foreign_busy'] * 100:.0f}% of one core",
    )
    row.calls_per_id()
    row.lost()


def bench_rows(f: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """``(figure, measured, target, met)`` rows of :func:`bench_figures`."""
    limit = f"{f['limit_rpm']:,.0f}/min (time x{f['scale']:g})"
    return [
        (
            f"goodput at a {limit} limit, 2 workers configured at it",
            f"{f['goodput_rpm']:,.0f}/min = {f['goodput_ratio'] * 100:.1f}%",
            "≥ 95% of the limit",
            f["goodput_ratio"] >= 0.95,
        ),
        (
            "calls answered 429 (same run)",
            f"{f['share_429'] * 100:.2f}%",
            "< 1%",
            f["share_429"] < 0.01,
        ),
        (
            "calls answered 429 after the first 30 s (scaled), workers configured at 2x the limit",
            f"{f['adaptive_share_429_after_warmup'] * 100:.2f}% (rate factor "
            f"{f['adaptive_final_factor']})",
            "< 5%",
            f["adaptive_share_429_after_warmup"] < 0.05,
        ),
        (
            "lost requests or errors (both runs)",
            f"{f['lost']} / {f['errors']}",
            "0 / 0",
            f["lost"] == 0 and f["errors"] == 0,
        ),
    ]


def build_table(results: dict[str, Figures], options: BenchOptions) -> Table:
    """The rows for the scenarios in ``results`` (``s1`` ... ``s5``)."""
    t = Table()
    s1, s2, s3, s4, s5 = (results.get(k) for k in ("s1", "s2", "s3", "s4", "s5"))
    if s1 is not None:
        _drain(_Scenario(t, "1 backlog drain, 1 worker", s1), options)
    if s2 is not None:
        _bare_loop(_Scenario(t, "2 bare loop (aiohttp, same core)", s2), s1)
    if s3 is not None:
        _steady(_Scenario(t, f"3 steady load, {options.steady_seconds:.0f} s", s3))
    if s4 is not None:
        _scale_out(_Scenario(t, "4 scale-out, 2 workers", s4), s1)
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
        f"{m['os']}, {m['python']} ({m['interpreter']})\n"
        f"placement: {rig_info['placement']}\n"
        f"broker: {rig_info['broker']}\n"
    )
    return header + "\n" + build_table(results, options).render()
