"""Settings of the ingress deployable (``llmstream ingress``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from llmstream.core.catalog import CatalogParams
from llmstream.core.sessions import SessionParams
from llmstream.core.settings import ServiceSettings
from llmstream.core.tools import ToolParams

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class IngressSettings(ToolParams, SessionParams, CatalogParams, ServiceSettings):
    """Everything the ingress reads from the environment (``LLMSTREAM_*`` plus Kafka/Redis).

    The models ``GET /v1/models`` lists come from the workers' own variables
    (``LLMSTREAM_PRICES``, ``LLMSTREAM_FALLBACKS``, ... : :class:`CatalogParams`).

    ``api_keys`` maps the SHA-256 hex digest of each API key to the client identity it stands
    for, e.g. ``LLMSTREAM_API_KEYS='{"<sha256hex>": "team-a"}'``. The keys themselves are never
    configured, stored or logged. With no keys configured, authentication is off.
    """

    # The service's config, not the catalog's (whose extra="forbid" is for its own use).
    model_config = ServiceSettings.model_config

    host: str = "0.0.0.0"  # noqa: S104 - a service: reached from other hosts in a deployment
    port: int = Field(8080, ge=0, le=65535)

    api_keys: dict[str, str] = Field(default_factory=dict, repr=False)

    # Requests per minute per client (the API key's identity, else the peer address), shared by
    # every replica through Redis; bursts of up to `rate_limit_burst` at once. 0 turns it off.
    rate_limit_per_minute: int = Field(1200, ge=0)
    rate_limit_burst: int = Field(100, ge=1)
    # Failed authentications (a missing or wrong API key) per source address, shared through
    # Redis: once spent, every call from that address answers 429 until the budget refills,
    # the right key's too (else a right guess shows by not being refused). 0 turns it off.
    auth_failures_per_minute: int = Field(30, ge=0)
    auth_failures_burst: int = Field(10, ge=1)

    max_batch: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # One encoded request must fit in a Kafka message (the broker's message.max.bytes, 1 MiB
    # by default); a bigger one is refused with 413 rather than failing at the broker.
    max_event_bytes: int = Field(1_000_000, ge=1024)

    # How long POST /v1/chat/completions waits for the outcome before answering 504.
    chat_timeout_s: float = Field(120.0, gt=0)
    # While it waits, a chat request also reads its outcome from Redis this often (backing off
    # to 5 s): the safety net should the listener fall behind or miss it.
    result_poll_s: float = Field(1.0, gt=0)
    # A request recorded as queued this long ago, but never claimed by a worker, is published
    # again when resubmitted: the ingress may have died between recording and publishing.
    requeue_after_s: float = Field(120.0, gt=0)

    # Producer batching (acks, idempotence and compression are the shared LLMSTREAM_KAFKA_*).
    linger_ms: int = Field(2, ge=0)
    publish_timeout_s: float = Field(15.0, gt=0)
    # The responses listener's fetch wait: the longest a response can sit before it is seen when
    # the broker holds a fetch open (Apache Kafka answers as soon as data is there).
    listener_fetch_max_wait_ms: int = Field(500, ge=1)

    # Streaming (ingress/chunks.py, ingress/streaming.py). Chunks of streamed answers are read
    # from the chunks topic by one consumer per replica and fanned out to every client streaming.
    # Recent chunks kept per request, so a follower that joins late gets them from the first:
    # at most this many bytes in all, and a request's for this long after its last chunk. An
    # older request's chunks are read back from the topic (from its queue time).
    stream_buffer_bytes: int = Field(32 * 1024 * 1024, ge=0)
    stream_buffer_age_s: float = Field(300.0, ge=0)
    # How far the clocks of ingress replicas and workers may disagree: a read-back starts this
    # much before the request's queue time.
    stream_clock_skew_s: float = Field(10.0, ge=0)
    # Chunks a streaming client may fall behind by before it is dropped (its stream ends with
    # an error saying so): a slow client never slows the reader or the other clients.
    stream_client_backlog: int = Field(1000, ge=1)
    # How long a stream waits, after the final response, for the chunk that ends its answer
    # (the two travel on different topics); then what is missing comes from the response.
    stream_final_chunk_wait_s: float = Field(5.0, ge=0)
    # A comment line this often keeps idle streams open through proxies.
    stream_keepalive_s: float = Field(15.0, gt=0)

    # Graceful shutdown: how long in-flight HTTP requests get to finish after SIGTERM.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Each /ready check (Kafka metadata, Redis PING) gives up after this long.
    ready_timeout_s: float = Field(2.0, gt=0)

    @field_validator("api_keys")
    @classmethod
    def _hashes(cls, value: dict[str, str]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for digest, client in value.items():
            normalized = digest.strip().lower()
            if not _SHA256_HEX.match(normalized):
                # Do not echo the value: it may be a key pasted where its hash belongs.
                raise ValueError(
                    "api_keys must map SHA-256 hex digests (64 hex characters) of the API keys "
                    "to client ids; one entry is not a SHA-256 hex digest"
                )
            if not client or len(client) > 256:
                raise ValueError("each api_keys client id must be 1 to 256 characters")
            keys[normalized] = client
        return keys

    @property
    def auth_enabled(self) -> bool:
        """False when no API keys are configured: every request is let in."""
        return bool(self.api_keys)
