"""Start-up check: a request's record must outlive every way its event can be read again.

A record lives ``LLMSTREAM_RESULT_TTL_S``. An event is read again while the requests topic keeps
it (``retention.ms``; retention is a minimum, segments go later) if the group's committed offsets
are gone (``offsets.retention.minutes`` after the group went idle, then
``LLMSTREAM_AUTO_OFFSET_RESET=earliest`` re-reads everything). An event read after its record
expired is called again, so the worker refuses to start unless the TTL is at least both, or
``LLMSTREAM_ACCEPT_RETENTION_BEYOND_TTL=true`` says the operator accepts that. Infinite retention
(-1) can never be outlasted: it needs that acknowledgement too.

A broker that does not answer DescribeConfigs (the embedded Tansu broker closes the connection)
gets one warning line, and the worker starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from llmstream.core.connections import kafka_client_options
from llmstream.core.errors import LLMStreamError
from llmstream.processors.settings import WorkerSettings

log = logging.getLogger(__name__)

_TOPIC_RETENTION = "retention.ms"
_OFFSETS_RETENTION = "offsets.retention.minutes"


class RetentionError(LLMStreamError):
    """The result TTL is shorter than what the broker keeps (said in one line)."""


def retention_problem(
    ttl_s: int, topic_retention_ms: int | None, offsets_retention_min: int | None
) -> str | None:
    """Why ``ttl_s`` does not outlast the retentions (None when it does; None for unknown)."""
    found = []
    if topic_retention_ms is not None and (
        topic_retention_ms < 0 or topic_retention_ms > ttl_s * 1000
    ):
        found.append(f"{_TOPIC_RETENTION}={topic_retention_ms} of the requests topic")
    if offsets_retention_min is not None and (
        offsets_retention_min < 0 or offsets_retention_min * 60 > ttl_s
    ):
        found.append(f"{_OFFSETS_RETENTION}={offsets_retention_min} of the broker")
    if not found:
        return None
    return (
        f"LLMSTREAM_RESULT_TTL_S={ttl_s} is shorter than {' and '.join(found)}: a request read "
        "again after its record expired would be called again; raise LLMSTREAM_RESULT_TTL_S "
        "(or lower the retention), or set LLMSTREAM_ACCEPT_RETENTION_BEYOND_TTL=true to accept it"
    )


async def check_retention(settings: WorkerSettings) -> None:
    """Raise :class:`RetentionError` unless the result TTL outlasts the broker's retentions."""
    try:
        async with asyncio.timeout(30):
            topic_ms, offsets_min = await _read_retentions(settings)
    except (KafkaError, OSError, ValueError) as exc:
        log.warning(
            "cannot read %s of %s or the broker's %s (%s): LLMSTREAM_RESULT_TTL_S=%d is not "
            "checked against them",
            _TOPIC_RETENTION,
            settings.requests_topic,
            _OFFSETS_RETENTION,
            type(exc).__name__,
            settings.result_ttl_s,
        )
        return
    problem = retention_problem(settings.result_ttl_s, topic_ms, offsets_min)
    if problem is None:
        return
    if settings.accept_retention_beyond_ttl:
        log.warning("%s (accepted by LLMSTREAM_ACCEPT_RETENTION_BEYOND_TTL)", problem)
        return
    raise RetentionError(problem)


async def _read_retentions(settings: WorkerSettings) -> tuple[int | None, int | None]:
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        topic = ConfigResource(
            ConfigResourceType.TOPIC, settings.requests_topic, {_TOPIC_RETENTION: None}
        )
        (topic_response,) = await admin.describe_configs([topic])
        cluster = await admin.describe_cluster()
        broker_id = str(cluster["controller_id"])
        if broker_id == "-1":
            broker_id = str(cluster["brokers"][0]["node_id"])
        broker = ConfigResource(ConfigResourceType.BROKER, broker_id, {_OFFSETS_RETENTION: None})
        (broker_response,) = await admin.describe_configs([broker])
    finally:
        await admin.close()
    return (
        _config_value(topic_response, _TOPIC_RETENTION),
        _config_value(broker_response, _OFFSETS_RETENTION),
    )


def _config_value(response: Any, name: str) -> int | None:
    for error_code, error_message, _, resource, entries in response.resources:
        if error_code:
            raise ValueError(f"DescribeConfigs of {resource}: {error_message or error_code}")
        for entry in entries:
            if entry[0] == name and entry[1] is not None:
                return int(entry[1])
    return None
