"""``llmstream bench``'s arithmetic and report: no timing, no services (the bench is a command)."""

from __future__ import annotations

import argparse
import math

import pytest

from llmstream.devtools.bench import (
    BenchOptions,
    Figures,
    arrival_bursts,
    bench_options,
    build_table,
    histogram_quantile,
    percentile,
)


def _args(**kw: object) -> argparse.Namespace:
    fields = {
        "requests": None,
        "latency_ms": None,
        "in_flight": None,
        "steady_seconds": None,
        "partitions": None,
        "json": None,
        "scenarios": None,
        "quick": False,
    }
    fields.update(kw)
    return argparse.Namespace(**fields)


def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    # 100 observations: 50 at or below 1 ms, 40 in (1, 2] ms, 10 in (2, 5] ms.
    buckets = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, math.inf: 100.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(0.0015)
    assert histogram_quantile(buckets, 0.95) == pytest.approx(0.0035)


def test_histogram_quantile_beyond_the_last_bucket_reports_its_bound() -> None:
    buckets = {0.001: 1.0, math.inf: 10.0}
    assert histogram_quantile(buckets, 0.99) == 0.001
    assert math.isnan(histogram_quantile({0.001: 0.0, math.inf: 0.0}, 0.5))


def test_percentile_is_the_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert math.isnan(percentile([], 0.5))


def test_options_default_quick_and_scenarios() -> None:
    assert bench_options(_args()) == BenchOptions()
    quick = bench_options(_args(quick=True, in_flight=300))
    assert quick.requests < BenchOptions().requests and quick.in_flight == 300
    assert bench_options(_args(scenarios="3,1")).scenarios == (1, 3)
    with pytest.raises(SystemExit):
        bench_options(_args(scenarios="1,9"))
    with pytest.raises(SystemExit):
        bench_options(_args(scenarios="one"))


def test_the_table_shows_each_figure_beside_its_target() -> None:
    s1 = Figures()
    s1.values.update(
        rps=1000.0,
        cpu_s_per_1000=0.5,
        worker_busy=0.9,
        mean_in_flight=300.0,
        peak_rss_bytes=100e6,
        calls_per_id=1.0,
        lost=0,
        others_busy=0.4,
        foreign_busy=0.0,
    )
    s2 = Figures()
    s2.values.update(rps=2400.0, cpu_s_per_1000=0.25, busy=0.6, calls_per_id=1.0)
    table = build_table({"s1": s1, "s2": s2}, BenchOptions(scenarios=(1, 2))).render()
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert "**missed** (-33%)" in rows["completed requests/s (first pick-up to last response sent)"]
    assert "| met |" in rows["worker CPU s per 1,000 requests (utime+stime, /proc)"]
    assert "0.42" in rows["pipeline / bare loop, requests/s"]
    assert all(line.startswith("|") and line.endswith("|") for line in table.splitlines())


def test_arrival_bursts_are_told_apart_by_gaps() -> None:
    # Two bursts of three, 750 ms apart, then one of two.
    times = [0, 1, 2, 750, 751, 753, 1500, 1502]
    assert arrival_bursts(times) == (3, 750)
    assert all(math.isnan(x) for x in arrival_bursts([]))
