"""Prometheus metrics of the worker, on a registry passed in (tests use their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
_OTHER = "other"


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


class WorkerMetrics:
    """Every metric the worker exports, prefixed ``llmstream_``."""

    def __init__(self, registry: CollectorRegistry, *, max_models: int = 200) -> None:
        self.registry = registry
        self.model_label = BoundedLabel(max_models)
        self.requests = Counter(
            "llmstream_requests_total",
            "Request outcomes by status (success, error, duplicate, cache_hit, expired).",
            ["status", "provider", "model"],
            registry=registry,
        )
        self.errors = Counter(
            "llmstream_errors_total",
            "Events sent to llm-errors, by error type.",
            ["error_type"],
            registry=registry,
        )
        self.provider_latency = Histogram(
            "llmstream_provider_latency_seconds",
            "Time spent on the provider for one request, retries and their waits included.",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "llmstream_queue_seconds",
            "From the request's created_at_ms to pick-up by a worker.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "llmstream_worker_overhead_seconds",
            "Time in the worker minus time waiting on the provider, per request.",
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.attempts = Histogram(
            "llmstream_provider_attempts",
            "Provider attempts per finished request.",
            ["provider"],
            buckets=(1, 2, 3, 4, 5, 7, 10),
            registry=registry,
        )
        self.retries = Counter(
            "llmstream_retries_total",
            "Provider calls retried, by error type.",
            ["provider", "error_type"],
            registry=registry,
        )
        self.tokens = Counter(
            "llmstream_tokens_total",
            "Tokens reported by providers.",
            ["provider", "model", "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "llmstream_in_flight_requests",
            "Requests being processed in this worker.",
            registry=registry,
        )
        self.dedup = Counter(
            "llmstream_dedup_total",
            "Dedup decisions: claimed, takeover, recovered, duplicate, waited.",
            ["outcome"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "llmstream_redis_up",
            "1 when the last Redis operation succeeded.",
            registry=registry,
        )
        self.committable = Counter(
            "llmstream_acked_events_total",
            "Events whose offsets were released for commit, in order.",
            registry=registry,
        )
