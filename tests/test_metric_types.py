"""The worker's counters and histograms (processors/metrics.py) take a shorter path than
prometheus_client's own on every request: they must expose exactly what the library's would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from llmstream.processors.metrics import _counter, _histogram

BUCKETS = (0.001, 0.0025, 0.01, 0.1, 1.0, 10.0)
# Below, on and between the bounds, past the last finite one, zero, negative and infinite.
AMOUNTS = [0.0, 0.0005, 0.001, 0.0011, 0.0025, 0.005, 0.1, 0.5, 1.0, 9.99, 10.0, 11.0]
AMOUNTS += [-1.0, 1e9, math.inf]


def _exposition(registry: CollectorRegistry) -> list[str]:
    # Creation times differ between two registries; every other line must be the same.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_histograms_put_each_amount_in_the_librarys_bucket() -> None:
    ours_registry, library_registry = CollectorRegistry(), CollectorRegistry()
    ours = _histogram(ours_registry, "t_seconds", "t", ["kind"], buckets=BUCKETS)
    library = Histogram(
        "llmstream_t_seconds", "t", ["kind"], buckets=BUCKETS, registry=library_registry
    )
    for amount in AMOUNTS:
        ours.labels("a").observe(amount)
        library.labels("a").observe(amount)
    ours.labels("b").observe(math.nan)
    library.labels("b").observe(math.nan)
    assert _exposition(ours_registry) == _exposition(library_registry)


def test_counters_count_as_the_librarys_and_refuse_what_it_refuses() -> None:
    ours_registry, library_registry = CollectorRegistry(), CollectorRegistry()
    ours = _counter(ours_registry, "t_total", "t", ["kind"])
    library = Counter("llmstream_t_total", "t", ["kind"], registry=library_registry)
    for amount in (1, 2.5, 0, 1e9):
        ours.labels("a").inc(amount)
        library.labels("a").inc(amount)
    ours.labels("b").inc()
    library.labels("b").inc()
    assert _exposition(ours_registry) == _exposition(library_registry)
    with pytest.raises(ValueError, match="non-negative"):
        ours.labels("a").inc(-1)
    with pytest.raises(ValueError, match="missing label values"):
        ours.inc()  # the labelled parent holds no value


def test_a_labelled_histogram_parent_refuses_an_observation() -> None:
    ours = _histogram(CollectorRegistry(), "t_seconds", "t", ["kind"], buckets=BUCKETS)
    with pytest.raises(ValueError, match="missing label values"):
        ours.observe(1.0)
