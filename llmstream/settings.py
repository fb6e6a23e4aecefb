"""Settings every deployable shares: where Kafka and Redis are, topic names, the output format.

Each deployable (worker, ingress, simulator) has one pydantic-settings class that derives from
:class:`ServiceSettings`; the environment is read there and nowhere else. Kafka and Redis take the
ecosystem's own variables (``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``); everything else is
``LLMSTREAM_*``.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.codec import WireFormat


class ServiceSettings(BaseSettings):
    """Connection and contract settings shared by the worker and the ingress."""

    model_config = SettingsConfigDict(
        env_prefix="LLMSTREAM_", extra="ignore", populate_by_name=True, frozen=True
    )

    kafka_bootstrap_servers: str = Field(
        "localhost:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
    )
    redis_url: str = Field(
        "redis://localhost:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url")
    )
    redis_key_prefix: str = "llmstream:"
    requests_topic: str = "llm-requests"
    responses_topic: str = "llm-responses"
    metrics_topic: str = "llm-metrics"
    errors_topic: str = "llm-errors"
    output_format: WireFormat = WireFormat.JSON
    # How long completed and failed results stay in Redis for the ingress (and for dedup).
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
