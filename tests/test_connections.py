"""Kafka security, compression and producer guarantees: from settings to what the clients get.

SASL and TLS cannot be exercised against a broker here (Tansu has neither): these tests pin the
mapping from ``LLMSTREAM_KAFKA_*`` to the aiokafka clients' options, the worker's included.
Compression and the idempotent producer are checked on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from pathlib import Path

import certifi
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from llmstream.core.connections import (
    KafkaSetupError,
    kafka_client_options,
    kafka_producer_options,
    negotiate_idempotence,
)
from llmstream.core.settings import ServiceSettings
from llmstream.processors.kafka_io import consumer_options, create_producer
from llmstream.processors.settings import WorkerSettings
from tests.conftest import Services

CA = Path(certifi.where())


def test_plaintext_by_default_with_acks_all_and_the_idempotent_producer() -> None:
    settings = ServiceSettings(kafka_bootstrap_servers="k1:9092,k2:9092")
    assert kafka_client_options(settings) == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "security_protocol": "PLAINTEXT",
    }
    producer = kafka_producer_options(settings)
    assert (producer["acks"], producer["enable_idempotence"], producer["compression_type"]) == (
        "all",
        True,
        None,
    )
    worker = consumer_options(WorkerSettings(kafka_bootstrap_servers="k1:9092,k2:9092"))
    assert worker["bootstrap_servers"] == "k1:9092,k2:9092"
    assert worker["security_protocol"] == "PLAINTEXT" and "ssl_context" not in worker


def test_sasl_ssl_with_scram_and_a_ca_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "LLMSTREAM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "LLMSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "LLMSTREAM_KAFKA_SASL_USERNAME": "llmstream",
        "LLMSTREAM_KAFKA_SASL_PASSWORD": "s3cret-pw",
        "LLMSTREAM_KAFKA_SSL_CAFILE": str(CA),
        "LLMSTREAM_KAFKA_COMPRESSION": "zstd",
    }.items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings()

    options = kafka_client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "llmstream",
        "s3cret-pw",
    )
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) > 10  # the bundle given, loaded
    assert kafka_producer_options(settings)["compression_type"] == "zstd"

    # The worker's consumer connects the same way.
    worker = consumer_options(WorkerSettings())
    assert (worker["security_protocol"], worker["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (worker["sasl_plain_username"], worker["sasl_plain_password"]) == (
        "llmstream",
        "s3cret-pw",
    )
    assert isinstance(worker["ssl_context"], ssl.SSLContext)

    # The secrets never show when settings are printed.
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)


def test_sasl_plaintext_and_ssl_only() -> None:
    sasl = ServiceSettings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    assert "ssl_context" not in kafka_client_options(sasl)
    assert kafka_client_options(sasl)["sasl_mechanism"] == "PLAIN"

    tls = ServiceSettings(kafka_security_protocol="SSL", kafka_ssl_cafile=CA)
    options = kafka_client_options(tls)
    assert options["security_protocol"] == "SSL" and "sasl_mechanism" not in options
    assert isinstance(options["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs kafka_sasl_username"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "use SASL_SSL"),
        ({"kafka_ssl_cafile": CA}, "use SSL or SASL_SSL"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": CA},
            "kafka_ssl_keyfile needs kafka_ssl_certfile",
        ),
        ({"kafka_compression": "brotli"}, "kafka_compression"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ],
)
def test_inconsistent_security_settings_are_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ServiceSettings(**values)  # type: ignore[arg-type]


def test_a_redis_password_never_shows() -> None:
    settings = ServiceSettings(redis_url="rediss://llm:hunter2@redis.internal:6380/0")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    assert "rediss://llm:***@redis.internal:6380/0" in repr(settings)
    assert settings.redis_url.endswith("hunter2@redis.internal:6380/0")  # still usable


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_every_compression_codec_round_trips(settings: ServiceSettings, codec: str) -> None:
    compressed = settings.model_copy(update={"kafka_compression": codec})
    producer = AIOKafkaProducer(**kafka_producer_options(compressed))
    await producer.start()
    try:
        await producer.send_and_wait(settings.requests_topic, b"x" * 10_000, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(settings.requests_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        record = await asyncio.wait_for(consumer.getone(), 10)
    finally:
        await consumer.stop()
    assert record.value == b"x" * 10_000


@pytest.mark.integration
async def test_the_idempotent_producer_is_requested_from_the_broker(
    services: Services, settings: ServiceSettings
) -> None:
    """Tansu cannot grant producer IDs: asking for one fails, which shows the setting reaches
    the broker, from the worker's producer and from the other clients' producer."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or services.idempotent_producer:
        pytest.skip("needs the embedded Tansu broker, which refuses InitProducerId")
    off = WorkerSettings(**settings.model_dump())
    on = off.model_copy(update={"kafka_idempotent_producer": True})

    plain = create_producer(off)
    await plain.start()
    await plain.stop()
    idempotent = create_producer(on)
    with pytest.raises(KafkaError):
        await asyncio.wait_for(idempotent.start(), 20)
    with contextlib.suppress(Exception):
        await idempotent.stop()

    producer = AIOKafkaProducer(**kafka_producer_options(on))
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.start(), 20)
    with contextlib.suppress(Exception):
        await producer.stop()


@pytest.mark.integration
async def test_an_unset_idempotence_setting_follows_what_the_broker_grants(
    services: Services, settings: ServiceSettings, caplog: pytest.LogCaptureFixture
) -> None:
    unset = settings.model_copy(update={"kafka_idempotent_producer": None})
    with caplog.at_level("WARNING", logger="llmstream.core.connections"):
        decided = await negotiate_idempotence(unset)
    if services.idempotent_producer:
        assert decided.kafka_idempotent_producer is True
        assert not caplog.records
        return
    # The embedded broker refuses InitProducerId: one line says so, and producers still work.
    assert decided.kafka_idempotent_producer is False
    (notice,) = caplog.records
    assert "without idempotence" in notice.getMessage()
    assert "\n" not in notice.getMessage() and notice.exc_info is None
    producer = AIOKafkaProducer(**kafka_producer_options(decided))
    await producer.start()
    await producer.stop()


@pytest.mark.integration
async def test_insisting_on_idempotence_fails_in_one_line_naming_the_setting(
    services: Services, settings: ServiceSettings
) -> None:
    if services.idempotent_producer:
        pytest.skip("needs a broker that refuses InitProducerId (the embedded Tansu broker)")
    insist = settings.model_copy(update={"kafka_idempotent_producer": True})
    with pytest.raises(KafkaSetupError, match="LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER") as raised:
        await negotiate_idempotence(insist)
    assert "\n" not in str(raised.value)
    off = settings.model_copy(update={"kafka_idempotent_producer": False})
    assert await negotiate_idempotence(off) is off  # off means no probe at all


@pytest.mark.integration
def test_a_worker_insisting_on_idempotence_exits_with_one_line(
    services: Services, settings: ServiceSettings
) -> None:
    if services.idempotent_producer:
        pytest.skip("needs a broker that refuses InitProducerId (the embedded Tansu broker)")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REDIS_URL": settings.redis_url,
        "LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER": "true",
    }
    run = subprocess.run(
        [sys.executable, "-m", "llmstream.cli", "worker"], env=env, capture_output=True, timeout=120
    )
    assert run.returncode == 2
    lines = run.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("llmstream worker: ")
    assert "LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER" in lines[-1]
    assert "Traceback" not in run.stderr.decode()
