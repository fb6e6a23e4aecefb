"""How llmstream's Kafka clients connect: security, compression and producer guarantees.

Every Kafka client llmstream makes takes its options from here (the worker's faust app, the
ingress's producer and response listener, the consumer-lag sampler, ``llmstream replay``), so a
setting is honoured by all of them or by none::

    AIOKafkaConsumer(**kafka_client_options(settings), group_id=None)
    AIOKafkaProducer(**kafka_producer_options(settings), linger_ms=2)
    faust.App(settings.consumer_group, **faust_options(settings))

Passwords go from ``SecretStr`` straight into the client; they are never logged.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from llmstream.core.settings import ServiceSettings


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
        "enable_idempotence": settings.kafka_idempotent_producer,
        "compression_type": _compression(settings),
    }


def faust_options(settings: ServiceSettings) -> dict[str, Any]:
    """A ``faust.App``'s broker settings: brokers, credentials, acks and compression.

    faust 0.15 has no setting for the idempotent producer (it turns it on only inside
    transactions): :func:`llmstream.processors.worker.create_faust_app` adds it.
    """
    import faust

    context = kafka_ssl_context(settings)
    credentials: Any = None
    if settings.kafka_security_protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # checked by the settings
        # With a TLS context faust speaks SASL_SSL, without one SASL_PLAINTEXT.
        credentials = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    return {
        "broker": [
            f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")
        ],
        "broker_credentials": credentials,
        "producer_acks": -1,
        "producer_compression_type": _compression(settings),
    }


def _compression(settings: ServiceSettings) -> str | None:
    return None if settings.kafka_compression == "none" else settings.kafka_compression
