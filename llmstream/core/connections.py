"""How llmstream's Kafka clients connect: security, compression and producer guarantees.

Every Kafka client llmstream makes takes its options from here (the worker's consumer and
producer, the ingress's producer and response listener, the consumer-lag sampler, ``llmstream
replay``), so a setting is honoured by all of them or by none::

    settings = await negotiate_idempotence(settings)  # once, before the first producer
    AIOKafkaConsumer(**kafka_client_options(settings), group_id=None)
    AIOKafkaProducer(**kafka_producer_options(settings), linger_ms=2)

Redis clients come from :func:`redis_client`, a single Redis or Redis Cluster as configured.

Passwords go from ``SecretStr`` straight into the client; they are never logged.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import BrokerResponseError, KafkaError
from aiokafka.helpers import create_ssl_context
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from llmstream.core.errors import LLMStreamError
from llmstream.core.record import AnyRedis
from llmstream.core.settings import ServiceSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)


class KafkaSetupError(LLMStreamError):
    """The Kafka cluster cannot give what the settings insist on (said in one line)."""


def kafka_ssl_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (hostname checked), else None."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    password = settings.kafka_ssl_keyfile_password
    context: ssl.SSLContext = create_ssl_context(
        cafile=settings.kafka_ssl_cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
        password=password.get_secret_value() if password is not None else None,
    )
    return context


def kafka_client_options(settings: ServiceSettings) -> dict[str, Any]:
    """Keyword arguments of any aiokafka client (consumer, producer, admin): brokers, security."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    context = kafka_ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # checked by the settings
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def kafka_producer_options(settings: ServiceSettings) -> dict[str, Any]:
    """An ``AIOKafkaProducer``'s arguments: the client's, acks from all in-sync replicas,
    idempotence and compression as configured."""
    return {
        **kafka_client_options(settings),
        "acks": "all",
        "enable_idempotence": idempotence_wanted(settings),
        "compression_type": _compression(settings),
    }


def idempotence_wanted(settings: ServiceSettings) -> bool:
    """Whether producers ask for idempotence: unless turned off, or found unsupported by
    :func:`negotiate_idempotence`."""
    return settings.kafka_idempotent_producer is not False


async def negotiate_idempotence(settings: S) -> S:
    """``settings`` with ``kafka_idempotent_producer`` decided against the real cluster.

    A broker that cannot grant producer IDs (the embedded Tansu broker answers InitProducerId with
    an error) gets a one-line warning and producers without idempotence, when the setting was left
    unset; when it was set to true, :class:`KafkaSetupError` names the setting. An unreachable
    cluster is not decided here: the caller's own start-up meets it and says so.
    """
    if settings.kafka_idempotent_producer is False:
        return settings
    producer = AIOKafkaProducer(**{**kafka_producer_options(settings), "enable_idempotence": True})
    sender_log = logging.getLogger("aiokafka.producer.sender")
    level = sender_log.level
    sender_log.setLevel(logging.CRITICAL)  # its traceback of the refused InitProducerId is noise
    try:
        await producer.start()
    except BrokerResponseError as exc:
        if settings.kafka_idempotent_producer:
            raise KafkaSetupError(
                f"the Kafka cluster at {settings.kafka_bootstrap_servers} refuses the idempotent "
                f"producer ({type(exc).__name__} to InitProducerId); "
                "unset LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER or set it to false"
            ) from None
        log.warning(
            "the Kafka cluster at %s cannot grant producer IDs (%s): producing without "
            "idempotence; set LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER=false to skip this check",
            settings.kafka_bootstrap_servers,
            type(exc).__name__,
        )
        return settings.model_copy(update={"kafka_idempotent_producer": False})
    except (KafkaError, OSError):
        return settings  # unreachable or refused: the caller's own start-up says so
    finally:
        sender_log.setLevel(level)
        await producer.stop()
    return settings.model_copy(update={"kafka_idempotent_producer": True})


def _compression(settings: ServiceSettings) -> str | None:
    return None if settings.kafka_compression == "none" else settings.kafka_compression


def redis_client(settings: ServiceSettings) -> AnyRedis:
    """The Redis client of every deployable: ``REDIS_URL`` (credentials and TLS as redis-py
    reads them from the URL), on Redis Cluster when ``LLMSTREAM_REDIS_CLUSTER=true``.

    Every key and script of llmstream is written for Redis Cluster (hash-tagged keys, scripts
    run per slot), so the choice changes nothing else. No connection is made here.
    """
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url)
    return Redis.from_url(settings.redis_url)
