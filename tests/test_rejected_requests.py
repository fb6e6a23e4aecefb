"""An event the worker rejects as invalid, read back through ``GET /v1/requests/{id}``.

The worker stores why it rejected an event whose request ID it can read (from the payload, else
the key) before the error reaches ``llm-errors``; the ingress answers ``failed`` with that error
when the ID has no record of a real request, and only with authentication off. A later valid
request with the ID is processed as new.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from llmstream.core.record import RecordKeys
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.codec import WireFormat, decode, encode
from llmstream.schemas.models import LLMError, LLMResponse
from tests.conftest import Services
from tests.harness import (
    WorkerProcess,
    in_process_ingress,
    produce,
    read_topic,
    request,
    worker_env,
)
from tests.inprocess import SOURCE, Rig, rig, worker_settings
from tests.test_ingress import API_KEYS, KEY_A, chat_body, ingress_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def worker_path(
    services: Services, settings: ServiceSettings, simulator: SimulatorServer
) -> AsyncIterator[Rig]:
    """The worker's request path in-process, on the ingress's Redis key prefix."""
    configured = worker_settings(
        services.redis_url, redis_key_prefix=settings.redis_key_prefix, result_ttl_s=600
    )
    async with rig(simulator, configured) as r:
        yield r


def invalid_json(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "model": 42}).encode()


async def test_an_invalid_event_reads_back_as_failed_and_its_id_is_then_served(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    rid = f"broken-{unique}"
    worker = WorkerProcess(worker_env(settings, simulator.url, f"g-{unique}"), tmp_path).start()
    try:
        await worker.wait_ready()
        # Straight to Kafka, without a key: the ID is read from the payload.
        await produce(bootstrap, settings.requests_topic, [(None, invalid_json(rid))])
        errors = await read_topic(
            bootstrap, settings.errors_topic, LLMError, lambda es: any(es), timeout=60
        )
        assert [(e.request_id, e.error_type) for e in errors] == [(rid, "invalid_request")]

        async with in_process_ingress(ingress_settings(settings)) as client:
            # Stored before it was emitted: readable as soon as the error is on the topic.
            failed = await client.get(f"/v1/requests/{rid}")
            assert failed.status_code == 200, failed.text
            body = failed.json()
            assert (body["status"], body["response"]) == ("failed", None)
            assert body["error"]["error_type"] == "invalid_request"
            assert body["error"]["field"] == "model"
            assert body["error"]["message"] == "model: Input should be a valid string (and 1 more)"
            assert "raw_payload" not in body["error"]

            submitted = await client.post(
                "/v1/requests", json={**chat_body("again"), "request_id": rid}
            )
            assert submitted.status_code == 202, submitted.text
            assert submitted.json()["requests"][0]["duplicate"] is False
            for _ in range(600):
                answer = (await client.get(f"/v1/requests/{rid}")).json()
                if answer["status"] != "pending":
                    break
                await asyncio.sleep(0.1)
        assert answer["status"] == "completed", answer
        assert answer["response"]["content"] == "echo: again"
        assert answer["error"] is None
    finally:
        worker.stop()


async def test_a_malformed_avro_event_is_recorded_under_the_id_it_starts_with(
    settings: ServiceSettings, worker_path: Rig, unique: str
) -> None:
    rid = f"avro-{unique}"
    truncated = encode(request(rid), WireFormat.AVRO)[:-3]

    await worker_path.process(truncated)

    [error] = worker_path.errors()
    assert (error.request_id, error.error_type, error.raw_payload) == (
        rid,
        "undecodable",
        truncated,
    )
    async with in_process_ingress(ingress_settings(settings)) as client:
        body = (await client.get(f"/v1/requests/{rid}")).json()
    assert (body["status"], body["error"]["error_type"], body["error"]["field"]) == (
        "failed",
        "undecodable",
        None,
    )


async def test_an_unreadable_payload_is_recorded_under_its_key(
    settings: ServiceSettings, worker_path: Rig, unique: str
) -> None:
    rid = f"keyed-{unique}"

    await worker_path.processor.process(b"\x00\xffnot json", rid.encode(), SOURCE)
    await worker_path.processor.process(b"\x00\xffnot json", b"bad\x00key", SOURCE)

    async with in_process_ingress(ingress_settings(settings)) as client:
        keyed = await client.get(f"/v1/requests/{rid}")
        control = await client.get("/v1/requests/bad%00key")
    assert keyed.status_code == 200 and keyed.json()["error"]["error_type"] == "undecodable"
    assert control.status_code == 404  # not a request ID: nothing recorded


async def test_a_rejection_never_replaces_a_real_requests_outcome(
    settings: ServiceSettings, worker_path: Rig, unique: str
) -> None:
    rid = f"real-{unique}"
    await worker_path.process(request(rid, text="first"))

    await worker_path.process(invalid_json(rid))

    assert [e.request_id for e in worker_path.errors()] == [rid]  # still reported
    async with in_process_ingress(ingress_settings(settings)) as client:
        body = (await client.get(f"/v1/requests/{rid}")).json()
    assert (body["status"], body["response"]["content"]) == ("completed", "echo: first")


async def test_with_api_keys_on_a_rejected_event_belongs_to_nobody(
    settings: ServiceSettings, worker_path: Rig, unique: str
) -> None:
    rid = f"private-{unique}"
    await worker_path.process(invalid_json(rid))

    async with in_process_ingress(ingress_settings(settings, api_keys=API_KEYS)) as client:
        with_key = await client.get(f"/v1/requests/{rid}", headers={"X-API-Key": KEY_A})
    async with in_process_ingress(ingress_settings(settings)) as client:
        without_auth = await client.get(f"/v1/requests/{rid}")

    assert with_key.status_code == 404
    assert with_key.json()["error"]["code"] == "not_found"
    assert without_auth.status_code == 200


async def test_the_record_expires_with_the_results_and_holds_no_raw_bytes(
    settings: ServiceSettings, worker_path: Rig, redis_client: aioredis.Redis, unique: str
) -> None:
    rid = f"ttl-{unique}"
    raw = invalid_json(rid)

    await worker_path.process(raw)

    keys = RecordKeys(settings.redis_key_prefix)
    key = keys.rejected(rid)
    assert 0 < await redis_client.ttl(key) <= worker_path.settings.result_ttl_s
    stored = decode(await redis_client.hget(key, "error"), LLMError)
    assert (stored.request_id, stored.raw_payload) == (rid, None)
    assert raw not in b"".join((await redis_client.hgetall(key)).values())
    assert await redis_client.exists(keys.record(rid)) == 0


async def test_a_valid_event_after_a_rejected_one_is_processed(
    settings: ServiceSettings, worker_path: Rig, unique: str
) -> None:
    rid = f"later-{unique}"
    await worker_path.process(invalid_json(rid))

    await worker_path.process(request(rid, text="now valid"))

    [response] = worker_path.responses()
    assert isinstance(response, LLMResponse) and response.content == "echo: now valid"
    assert len(await worker_path.calls(rid)) == 1
