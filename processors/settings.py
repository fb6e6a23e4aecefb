"""Settings of the worker deployable (``llmstream worker``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field

from llmstream.core.sessions import SessionParams
from llmstream.core.settings import ServiceSettings
from llmstream.core.tools import ToolParams
from llmstream.processors.adaptive import AdaptiveParams
from llmstream.processors.circuit import CircuitParams
from llmstream.processors.pricing import Price
from llmstream.processors.ratelimit import RateLimit
from llmstream.processors.retry import RetryPolicy
from llmstream.processors.tiers import TierParams


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# The traffic-control parts' knobs are declared once, on the part that uses them, and the worker's
# settings derive from them: each part takes exactly its own (``params=settings``).
class WorkerSettings(
    TierParams,
    ToolParams,
    SessionParams,
    CircuitParams,
    AdaptiveParams,
    RetryPolicy,
    ServiceSettings,
):
    """Everything the worker reads from the environment (``LLMSTREAM_*`` plus Kafka/Redis).

    Retries (``LLMSTREAM_MAX_ATTEMPTS``, ``LLMSTREAM_RETRY_*``, ``LLMSTREAM_MAX_RETRY_AFTER_S``,
    ``LLMSTREAM_MAX_RATE_LIMITED_ATTEMPTS``) are :class:`RetryPolicy`'s fields; the adaptive
    rate (``LLMSTREAM_ADAPTIVE_*``, ``LLMSTREAM_RATE_LIMIT_DEFAULT_PAUSE_S``)
    :class:`AdaptiveParams`'; circuit breaking (``LLMSTREAM_CIRCUIT_*``) :class:`CircuitParams`'.
    """

    # The service's config, not the parts' (their extra="forbid" keeps a misspelt keyword from
    # passing silently; the environment reader must ignore what it does not know).
    model_config = ServiceSettings.model_config

    worker_id: str = Field(default_factory=_default_worker_id)
    consumer_group: str = "llmstream-worker"
    # Provider calls in flight at once in this process, over all partitions.
    max_in_flight: int = Field(500, ge=1, le=100_000)
    # A crashed worker's claims are taken over this long after its last heartbeat.
    lease_ms: int = Field(10_000, ge=1_000)
    # On SIGTERM, how long requests that wait (not calling) may take to finish before they are
    # handed over. Provider calls in flight are not cut at its end (see Worker._drain), so a
    # stop grace period must cover LLMSTREAM_PROVIDER_TIMEOUT_S as well.
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    # How often Redis is checked (reachable, still holding the deployment epoch), and how long
    # one check may take: claims pause, and /ready answers 503, within about one interval.
    redis_check_interval_s: float = Field(0.5, gt=0.0, le=10.0)
    redis_check_timeout_s: float = Field(2.0, gt=0.0)
    # Start even when the requests topic's retention.ms or the broker's
    # offsets.retention.minutes outlasts LLMSTREAM_RESULT_TTL_S (or is infinite): an event read
    # again after its record expired is then called again. Without it the worker refuses.
    accept_retention_beyond_ttl: bool = False
    # Kafka group membership. A killed worker's partitions wait for its session to time out
    # (it sends no LeaveGroup), and every worker stops in the rebalance that follows: 10 s
    # rather than 30 cut that stall from ~57 s to ~12 s on the embedded broker. Apache Kafka
    # accepts sessions from 6 s (group.min.session.timeout.ms); a heartbeat is a third of one.
    session_timeout_s: float = Field(10.0, ge=1.0)
    rebalance_timeout_s: float = Field(60.0, ge=1.0)
    heartbeat_interval_s: float = Field(3.0, gt=0.0)
    # Static membership (KIP-345, Apache Kafka 2.3+): a stable identity per worker, unique in
    # the group, such as the pod's name. A worker restarted under the same identity within the
    # session timeout gets its partitions back with no rebalance of the others; a worker that
    # stops for good keeps its partitions unserved until its session times out, because a
    # static member sends no LeaveGroup. Unset: dynamic membership.
    group_instance_id: str | None = Field(None, min_length=1, max_length=249)
    commit_interval_s: float = Field(1.0, gt=0.0)
    # How long the broker may hold a fetch while it has no new request (Kafka's fetch.max.wait.ms,
    # 500 by default). Apache Kafka answers as soon as a request arrives, so this only sets how
    # often an idle worker polls; the embedded broker holds every fetch about half of it.
    fetch_max_wait_ms: int = Field(500, ge=0, le=30_000)
    # Finished events a partition may hold behind an unfinished one (they cannot be committed
    # before it) before this worker pauses reading that partition; it resumes when the head
    # finishes. Bounds the ack gate's memory when one request waits long (processors/acks.py).
    max_pending_acks_per_partition: int = Field(10_000, ge=1)
    # Where a new consumer group starts: "earliest" so nothing produced before it is skipped.
    auto_offset_reset: str = "earliest"
    # A request without its own deadline_ms fails as provider_unavailable when it has no answer
    # this long after the worker began calling for it (retries, circuit waits, pauses and rate
    # waits included), so an unreachable provider cannot hold work forever. Also how long a
    # provider/model may keep failing before /ready answers 503.
    max_queue_s: float = Field(600.0, gt=0.0)
    # Re-emit the stored response to llm-responses when a completed request ID comes again.
    reemit_duplicates: bool = False
    # The largest output event the producer sends (Kafka's default max.message.bytes is ~1 MB).
    max_event_bytes: int = Field(1_000_000, ge=1024)
    # How often llmstream_consumer_lag_messages is sampled from the brokers; 0 turns it off.
    consumer_lag_interval_s: float = Field(15.0, ge=0.0)
    # Prometheus /metrics, /health and /ready.
    http_host: str = "0.0.0.0"  # noqa: S104 - scraped from other hosts in a deployment
    http_port: int = Field(9100, ge=0, le=65535)

    # --- traffic control (processors/traffic.py) ---------------------------------------------
    # Shared rate limits by provider ("openai") or model ("openai/gpt-4o"), and quotas by
    # client_id ("default" applies to each client without its own entry), as JSON:
    # {"openai": {"rpm": 600, "tpm": 200000}, "openai/gpt-4o": {"rpm": 100}}
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    client_quotas: dict[str, RateLimit] = Field(default_factory=dict)
    # Run this far below the configured limits, so the jitter between the decision and the
    # call's arrival cannot push a provider's one-minute window over.
    rate_limit_margin: float = Field(0.02, ge=0.0, lt=0.5)
    # A slot is reserved at most this far ahead (see processors/ratelimit.py).
    rate_limit_horizon_s: float = Field(0.5, gt=0.0, le=10.0)
    # Requests waiting for budget without holding an in-flight slot (processors/backpressure.py).
    max_waiting: int = Field(5000, ge=0)
    # Completion tokens assumed before the call when the request sets no max_tokens (TPM).
    tpm_default_completion_tokens: int = Field(256, ge=1)
    # Circuit breaking per provider/model; its knobs are CircuitParams' (processors/circuit.py).
    circuit_breaker: bool = True
    # How often circuits, pauses and rate factors are read from Redis (changes by other workers).
    traffic_sync_s: float = Field(0.5, gt=0.0)
    # Fallbacks by model for requests that name none: {"openai/gpt-4o": ["anthropic/claude-..."]}
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # Response cache: for requests with "cache": true, or every request at temperature 0.
    cache_ttl_s: int = Field(24 * 3600, ge=1)
    cache_temperature_zero: bool = False
    # Prices in USD per million tokens, over the built-in table: {"openai/gpt-4o":
    # {"input": 2.5, "output": 10}}; or a JSON/TOML file of the same shape.
    prices: dict[str, Price] = Field(default_factory=dict)
    prices_file: Path | None = None
