"""Prometheus metrics of the ingress, on a registry passed in (tests use their own)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX = "llmstream_ingress_"
_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_PUBLISH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15)


class IngressMetrics:
    """Every metric the ingress exports, prefixed ``llmstream_ingress_``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        count = self._counter
        self.requests = count(
            "requests_total",
            "HTTP requests answered, by route template and status code.",
            ["endpoint", "status"],
        )
        self.published = count(
            "published_total",
            "Requests published to llm-requests and acknowledged by the broker.",
        )
        self.publish_failures = count(
            "publish_failures_total",
            "Requests whose publication failed or timed out (the client got a 503).",
        )
        self.duplicates = count(
            "duplicates_total",
            "Submitted request IDs that were known already, so not published again.",
        )
        self.publish_time = Histogram(
            f"{_PREFIX}publish_seconds",
            "From handing a submission's events to the producer to the broker's acks for all.",
            buckets=_PUBLISH_BUCKETS,
            registry=registry,
        )
        self.rate_limited = count(
            "rate_limited_total", "Requests refused with 429 by the per-client rate limit."
        )
        self.auth_failures = count(
            "auth_failures_total",
            "Requests refused for their API key: missing (401) or not allowed (403).",
            ["reason"],
        )
        self.wait_time = Histogram(
            f"{_PREFIX}wait_seconds",
            "Chat completions: from publication to the outcome (or the timeout), by result.",
            ["result"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.outcomes = count(
            "outcomes_total",
            "Chat completion outcomes by where they were found: 'topic' (the response listener) "
            "or 'redis' (stored before the wait began, or the listener was behind).",
            ["source"],
        )
        self.waiting = Gauge(
            f"{_PREFIX}waiting_requests",
            "Chat completion requests waiting for their outcome in this replica.",
            registry=registry,
        )

        self.chunks_read = count(
            "chunks_read_total",
            "Records read from llm-response-chunks: once each, however many clients stream.",
        )
        self.chunk_read_backs = count(
            "chunk_read_backs_total",
            "Reads of a request's partition for a late follower whose chunks were not kept.",
        )
        self.stream_dropped = count(
            "stream_dropped_total",
            "Streaming clients dropped for falling too far behind "
            "(LLMSTREAM_STREAM_CLIENT_BACKLOG).",
        )
        self.streams = count(
            "streams_total",
            "Streams served, by kind (chat, sse, websocket) and how they ended.",
            ["kind", "end"],
        )
        self.followers = Gauge(
            f"{_PREFIX}stream_followers",
            "Clients following a request's chunks in this replica.",
            registry=registry,
        )
        self.kept_chunk_bytes = Gauge(
            f"{_PREFIX}kept_chunk_bytes",
            "Bytes of recent chunks kept for late followers (LLMSTREAM_STREAM_BUFFER_BYTES).",
            registry=registry,
        )

    def _counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(_PREFIX + name, documentation, labels, registry=self.registry)
