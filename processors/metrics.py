"""Prometheus metrics of the worker, on a registry passed in (tests use their own)."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
# Fine below 20 ms (the overhead target) so percentiles estimated from the buckets, as
# `llmstream bench` and Prometheus' histogram_quantile do, are within about 10-15% of the truth.
_OVERHEAD_BUCKETS = (
    *(i / 10_000 for i in (1, 2, 3, 4, 5, 6, 7, 8, 9)),
    *(i / 1000 for i in (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12.5, 15)),
    *(i / 1000 for i in (17.5, 20, 25, 30, 40, 50, 75, 100, 150, 250, 500, 1000, 2500)),
)
_OTHER = "other"
_UNKNOWN = "unknown"
_PREFIX = "llmstream_"

log = logging.getLogger(__name__)


class _CachedChildren:
    """``labels(...)`` answered from a dict after the first time: prometheus_client converts the
    values and takes a lock on every call, and a request looks up about ten children. Children
    are never removed here, so a cached one is always the registered one."""

    def labels(self, *values: Any, **by_name: Any) -> Any:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc]
        children: dict[tuple[Any, ...], Any] | None = self.__dict__.get("_cached_children")
        if children is None:
            children = self.__dict__["_cached_children"] = {}
        child = children.get(values)
        if child is None:
            child = children[values] = super().labels(*values)  # type: ignore[misc]
        return child


class _Counter(_CachedChildren, Counter):
    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        # Only an observable counter (a child, or one without labels) holds a value; anything
        # the library checks or refuses goes its way.
        value = self.__dict__.get("_value")
        if value is None or exemplar or not amount >= 0:
            super().inc(amount, exemplar)
            return
        value.inc(amount)


class _Gauge(_CachedChildren, Gauge):
    pass


class _Histogram(_CachedChildren, Histogram):
    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        # The library walks the buckets in turn (38 for the overhead histogram) after checking
        # that this is an observable metric: a bisection finds the same bucket, the first whose
        # bound is at least ``amount``. Anything else (no buckets: a labelled parent; an
        # exemplar; NaN, which no bucket takes) goes the library's way.
        buckets = self.__dict__.get("_buckets")
        if buckets is None or exemplar or amount != amount:
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        buckets[bisect_left(self._upper_bounds, amount)].inc(1)


def _counter(
    registry: CollectorRegistry, name: str, documentation: str, labels: Sequence[str] = ()
) -> Counter:
    return _Counter(_PREFIX + name, documentation, labels, registry=registry)


def _gauge(
    registry: CollectorRegistry, name: str, documentation: str, labels: Sequence[str] = ()
) -> Gauge:
    return _Gauge(_PREFIX + name, documentation, labels, registry=registry)


def _histogram(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    *,
    buckets: Sequence[float],
) -> Histogram:
    return _Histogram(_PREFIX + name, documentation, labels, buckets=buckets, registry=registry)


class BoundedLabel:
    """Keeps a label's distinct values finite: model names come from events, and an unbounded
    label would let one producer blow up every Prometheus that scrapes the worker."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return ""
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return _OTHER


def provider_label(name: str | None, known: Callable[[str], object]) -> str:
    """A provider name fit for a label: an event's provider field, or the first segment of its
    model, can be anything, so only providers this worker has configured (``known(name)`` is
    truthy) label a series; any other name is ``other``, none at all ``unknown``."""
    if not name:
        return _UNKNOWN
    return name if known(name) else _OTHER


class WorkerMetrics:
    """Every metric the worker exports, prefixed ``llmstream_``."""

    def __init__(self, registry: CollectorRegistry, *, max_models: int = 200) -> None:
        self.registry = registry
        self.model_label = BoundedLabel(max_models)
        # Error types are the pipeline's own; bounded anyway, as they travel in stored events.
        self.error_type_label = BoundedLabel(64)
        self.requests = _counter(
            registry,
            "requests_total",
            "Request outcomes by status (success, error, duplicate, cache_hit, expired).",
            ["status", "provider", "model"],
        )
        self.errors = _counter(
            registry,
            "errors_total",
            "Events sent to llm-errors, by error type.",
            ["error_type"],
        )
        self.provider_latency = _histogram(
            registry,
            "provider_latency_seconds",
            "Time spent on the provider for one request, retries and their waits included.",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_time = _histogram(
            registry,
            "queue_seconds",
            "From the request's created_at_ms to pick-up by a worker.",
            buckets=_LATENCY_BUCKETS,
        )
        self.overhead = _histogram(
            registry,
            "worker_overhead_seconds",
            "Time in the worker minus time waiting on the provider, per request.",
            buckets=_OVERHEAD_BUCKETS,
        )
        self.attempts = _histogram(
            registry,
            "provider_attempts",
            "Provider attempts per finished request.",
            ["provider"],
            buckets=(1, 2, 3, 4, 5, 7, 10),
        )
        self.retries = _counter(
            registry,
            "retries_total",
            "Provider calls retried, by error type.",
            ["provider", "error_type"],
        )
        self.tokens = _counter(
            registry,
            "tokens_total",
            "Tokens reported by providers.",
            ["provider", "model", "kind"],
        )
        self.in_flight = _gauge(
            registry,
            "in_flight_requests",
            "Requests being processed in this worker.",
        )
        self.dedup = _counter(
            registry,
            "dedup_total",
            "Dedup decisions: claimed, takeover, recovered, duplicate, waited.",
            ["outcome"],
        )
        self.redis_up = _gauge(
            registry,
            "redis_up",
            "1 when the last Redis operation succeeded.",
        )
        self.consumer_lag = _gauge(
            registry,
            "consumer_lag_messages",
            "Requests on llm-requests past the group's committed offset, per partition (every "
            "worker reports the whole group: aggregate with max by (topic, partition)).",
            ["topic", "partition"],
        )
        self.committable = _counter(
            registry,
            "acked_events_total",
            "Events whose offsets were released for commit, in order.",
        )
        self.held_acks = _gauge(
            registry,
            "held_acks",
            "Finished events whose offsets wait for an earlier, unfinished event of their "
            "partition before they can be committed.",
        )
        self.paused_partitions = _gauge(
            registry,
            "paused_partitions",
            "Partitions not read because they hold more than "
            "LLMSTREAM_MAX_PENDING_ACKS_PER_PARTITION finished events behind an unfinished one.",
        )
        self.tool_calls = _counter(
            registry,
            "tool_calls_total",
            "Server-side tool calls of the worker's tool loop, by tool (a name no registered tool "
            "has is 'unknown') and outcome (ok, or the error type the model was told).",
            ["tool", "status"],
        )
        self.tool_latency = _histogram(
            registry,
            "tool_latency_seconds",
            "Duration of the HTTP call of a server-side tool (calls made only).",
            ["tool"],
            buckets=_LATENCY_BUCKETS,
        )
        self.session_turns_dropped = _counter(
            registry,
            "session_turns_dropped_total",
            "Oldest turns of sessions dropped to keep them within LLMSTREAM_SESSION_MAX_MESSAGES "
            "and LLMSTREAM_SESSION_MAX_BYTES.",
        )


class TrafficMetrics:
    """Metrics of traffic control (rate limits, adaptive rate, circuits, cache, cost, fallbacks),
    on the worker's registry; ``model_label`` bounds model names as :class:`WorkerMetrics` does."""

    def __init__(
        self, registry: CollectorRegistry, *, model_label: BoundedLabel, max_clients: int = 100
    ) -> None:
        self.model_label = model_label
        # Client IDs come from events too: bounded like models.
        self.client_label = BoundedLabel(max_clients)
        self.rate_limit_wait = _histogram(
            registry,
            "rate_limit_wait_seconds",
            "Time a request waited for rate budget, a provider's pause or an open circuit.",
            ["provider"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.rate_limited = _counter(
            registry,
            "rate_limited_total",
            "Requests that waited for budget, by what made them wait (provider, model, client, "
            "pause), and calls the provider answered 429 (upstream_429).",
            ["provider", "scope"],
        )
        self.adaptive_factor = _gauge(
            registry,
            "adaptive_rate_factor",
            "Share of the configured rate a provider is sent at (1 = as configured).",
            ["provider"],
        )
        self.circuit_open = _gauge(
            registry,
            "circuit_open",
            "1 while the provider/model circuit is open (or half-open), else 0.",
            ["provider", "model"],
        )
        self.circuit_transitions = _counter(
            registry,
            "circuit_transitions_total",
            "Circuits opened (opened, reopened after a failed probe) and closed by this worker.",
            ["provider", "model", "transition"],
        )
        self.cache = _counter(
            registry,
            "cache_total",
            "Response cache lookups and stores: hit, miss, store, error.",
            ["outcome"],
        )
        self.cost = _counter(
            registry,
            "cost_usd_total",
            "Cost of provider calls in US dollars, from the price table.",
            ["provider", "model", "client"],
        )
        self.fallbacks = _counter(
            registry,
            "fallbacks_total",
            "Requests passed from one model to the next of their fallbacks.",
            ["from_model", "to_model"],
        )


class BatchMetrics:
    """Metrics of the batch tier (processors/batches), on the worker's registry. What batches
    saved against standard prices is ``llmstream_saved_usd_total{tier="batch"}``
    (:class:`processors.tiers.TierCosts`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.waiting = _gauge(
            registry,
            "batch_waiting_requests",
            "Requests gathered in this worker for a batch and not yet submitted, by provider.",
            ["provider"],
        )
        self.in_flight = _gauge(
            registry,
            "batches_in_flight",
            "Batches this worker submits or polls, by provider and state (submitting, then the "
            "provider's status: validating, in_progress, finalizing, ended ...).",
            ["provider", "state"],
        )
        self.turnaround = _histogram(
            registry,
            "batch_turnaround_seconds",
            "From a batch's submission to the end of its results, per batch.",
            ["provider"],
            buckets=(1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800),
        )
        self.submissions = _counter(
            registry,
            "batch_submissions_total",
            "Batch submissions by result: created, retried (the provider refused or failed; "
            "sent again), abandoned and adopted (after their submitter died), cancelled.",
            ["provider", "result"],
        )
        self.lines = _counter(
            registry,
            "batch_lines_total",
            "Batch lines read, by outcome: answered, failed, resubmitted (in a later batch), "
            "standard (called at once: its deadline is too near for another batch).",
            ["provider", "outcome"],
        )


class bookkeeping:  # lower case: it reads as a function, ``with bookkeeping(request_id):``
    """Metric updates, which run once the outcome is stored or delivered: one that fails is
    logged, and never turns a request already answered into a failure. (A class: a
    ``contextlib.contextmanager`` costs a generator and its wrapper, three times a request.)"""

    __slots__ = ("_request_id",)

    def __init__(self, request_id: str | None) -> None:
        self._request_id = request_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        log.error(
            "metrics not updated for %s; its outcome stands",
            self._request_id or "a request",
            exc_info=(kind, error, traceback),  # type: ignore[arg-type]
        )
        return True
