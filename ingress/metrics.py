"""Prometheus metrics of the ingress, on a registry passed in (tests use their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_PUBLISH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15)


class IngressMetrics:
    """Every metric the ingress exports, prefixed ``llmstream_ingress_``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "llmstream_ingress_requests_total",
            "HTTP requests answered, by route template and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.published = Counter(
            "llmstream_ingress_published_total",
            "Requests published to llm-requests and acknowledged by the broker.",
            registry=registry,
        )
        self.publish_failures = Counter(
            "llmstream_ingress_publish_failures_total",
            "Requests whose publication failed or timed out (the client got a 503).",
            registry=registry,
        )
        self.duplicates = Counter(
            "llmstream_ingress_duplicates_total",
            "Submitted request IDs that were known already, so not published again.",
            registry=registry,
        )
        self.publish_time = Histogram(
            "llmstream_ingress_publish_seconds",
            "From handing a submission's events to the producer to the broker's acks for all.",
            buckets=_PUBLISH_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "llmstream_ingress_rate_limited_total",
            "Requests refused with 429 by the per-client rate limit.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "llmstream_ingress_auth_failures_total",
            "Requests refused for their API key: missing (401) or not allowed (403).",
            ["reason"],
            registry=registry,
        )
        self.wait_time = Histogram(
            "llmstream_ingress_wait_seconds",
            "Chat completions: from publication to the outcome (or the timeout), by result.",
            ["result"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.outcomes = Counter(
            "llmstream_ingress_outcomes_total",
            "Chat completion outcomes by where they were found: 'topic' (the response listener) "
            "or 'redis' (stored before the wait began, or the listener was behind).",
            ["source"],
            registry=registry,
        )
        self.waiting = Gauge(
            "llmstream_ingress_waiting_requests",
            "Chat completion requests waiting for their outcome in this replica.",
            registry=registry,
        )
