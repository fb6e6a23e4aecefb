"""Settings of the worker deployable (``llmstream worker``)."""

from __future__ import annotations

import os
import socket

from pydantic import Field

from llmstream.settings import ServiceSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(ServiceSettings):
    """Everything the worker reads from the environment (``LLMSTREAM_*`` plus Kafka/Redis)."""

    worker_id: str = Field(default_factory=_default_worker_id)
    consumer_group: str = "llmstream-worker"
    # Provider calls in flight at once in this process, over all partitions.
    max_in_flight: int = Field(500, ge=1, le=100_000)
    # A crashed worker's claims are taken over this long after its last heartbeat.
    lease_ms: int = Field(10_000, ge=1_000)
    # Kafka group membership. Apache Kafka accepts session timeouts from 6 s (its default minimum).
    session_timeout_s: float = Field(30.0, ge=1.0)
    rebalance_timeout_s: float = Field(60.0, ge=1.0)
    heartbeat_interval_s: float = Field(3.0, gt=0.0)
    commit_interval_s: float = Field(1.0, gt=0.0)
    # Where a new consumer group starts: "earliest" so nothing produced before it is skipped.
    auto_offset_reset: str = "earliest"
    # Retry policy for provider calls (full jitter; Retry-After honoured).
    max_attempts: int = Field(5, ge=1, le=100)
    retry_base_delay_s: float = Field(0.5, gt=0.0)
    retry_max_delay_s: float = Field(30.0, gt=0.0)
    max_retry_after_s: float = Field(120.0, gt=0.0)
    # Re-emit the stored response to llm-responses when a completed request ID comes again.
    reemit_duplicates: bool = False
    # Prometheus /metrics, /health and /ready.
    http_host: str = "0.0.0.0"  # noqa: S104 - scraped from other hosts in a deployment
    http_port: int = Field(9100, ge=0, le=65535)
