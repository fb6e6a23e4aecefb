"""``llmstream replay`` end to end: a worker process, the simulator, the broker and Redis."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from llmstream.core.record import RecordKeys
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.replay import ReplayError, Selection, parse_time, replay
from llmstream.schemas.codec import decode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse
from tests.harness import (
    WorkerProcess,
    produce,
    provider_calls,
    read_outputs,
    read_raw,
    request,
    request_events,
    simulator_call,
    worker_env,
)


@pytest.fixture
def simulator_latency_ms() -> float:
    return 5.0


async def run_replay(settings: ServiceSettings, selection: Selection, **kw: bool) -> str:
    out = io.StringIO()
    await replay(settings, selection, out=out, **kw)
    return out.getvalue()


@pytest.mark.integration
async def test_replay_republishes_failed_requests_and_the_retry_succeeds(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    redis_client: aioredis.Redis,
    unique: str,
    tmp_path: Path,
) -> None:
    # zstd on every producer (worker, replay): the codec path is exercised too.
    settings = settings.model_copy(update={"kafka_compression": "zstd"})
    script = {"request_id": "bad-400", "responses": [{"status": 400}]}
    await simulator_call(simulator, "POST", "/_sim/script", script)
    now_ms = time.time_ns() // 1_000_000
    originals = [
        *request_events([request("bad-400"), request("late", deadline_ms=now_ms - 1000)]),
        (b"junk", b"not an event at all"),
    ]
    env = worker_env(settings, simulator.url, f"g-{unique}", LLMSTREAM_KAFKA_COMPRESSION="zstd")
    worker = WorkerProcess(env, tmp_path).start()
    try:
        await worker.wait_ready()
        await produce(settings.kafka_bootstrap_servers, settings.requests_topic, originals)
        errors = await read_outputs(settings, LLMError, 3)
        assert sorted(e.error_type for e in errors) == ["expired", "invalid_request", "undecodable"]
        assert await provider_calls(simulator) == {"bad-400": 1}

        # Dry run: lists what it would do, changes nothing, publishes nothing.
        everything = await run_replay(settings, Selection(), dry_run=True)
        assert "would replay" in everything and "bad-400" in everything and "late" in everything
        assert "skip (no request)" in everything and "junk" in everything
        assert (
            "3 error events read of 3 expected, 3 selected: would replay 2; "
            "skipped 1 no request to replay" in everything
        )
        key = RecordKeys(settings.redis_key_prefix).record("bad-400")
        state = await redis_client.hget(key, "state")
        assert state == b"failed"

        # By error type, with the command itself: only the 400 is replayed; the worker calls
        # the provider again and this time it answers.
        command = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmstream.cli", "replay", "--error-type", "invalid_request"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await command.communicate()
        assert command.returncode == 0, err.decode()
        output = out.decode()
        assert output.splitlines()[0].startswith("replayed") and "bad-400" in output
        assert "replayed 1" in output
        responses = await read_outputs(settings, LLMResponse, 1)
        assert [r.request_id for r in responses] == ["bad-400"]
        assert responses[0].content.startswith("echo:")
        assert await provider_calls(simulator) == {"bad-400": 2}

        # Replaying again: the request succeeded since, so it is not published (not paid twice).
        again = await run_replay(settings, Selection(request_ids=frozenset({"bad-400"})))
        assert "skip (succeeded since)" in again
    finally:
        worker.stop()
    published = await read_raw(
        settings.kafka_bootstrap_servers, settings.requests_topic, len(originals) + 2, timeout=3
    )
    assert len(published) == len(originals) + 1  # the one replay, no more
    assert await provider_calls(simulator) == {"bad-400": 2}


@pytest.mark.integration
async def test_replay_selects_by_time_and_id(settings: ServiceSettings) -> None:
    await produce(
        settings.kafka_bootstrap_servers,
        settings.errors_topic,
        [
            (
                f"r-{i}".encode(),
                LLMError(
                    request_id=f"r-{i}",
                    error_type="provider_error",
                    message="boom",
                    request=request(f"r-{i}"),
                    occurred_at_ms=1_000_000 + i * 1000,
                )
                .model_dump_json()
                .encode(),
            )
            for i in range(5)
        ],
    )

    async def selected(selection: Selection) -> list[str]:
        # These requests have no record (never seen by a worker): included on purpose.
        out = await run_replay(settings, selection, dry_run=True, include_expired=True)
        return [line.split()[2] for line in out.splitlines() if line.startswith("would replay")]

    assert await selected(Selection(since_ms=1_002_000, until_ms=1_004_000)) == ["r-2", "r-3"]
    assert await selected(Selection(request_ids=frozenset({"r-4", "r-0"}))) == ["r-0", "r-4"]
    assert await selected(Selection(limit=2)) == ["r-0", "r-1"]
    assert await selected(Selection(error_types=frozenset({"rate_limited"}))) == []


def error_event(request_id: str) -> bytes:
    error = LLMError(
        request_id=request_id,
        error_type="provider_error",
        message="boom",
        request=request(request_id),
        occurred_at_ms=time.time_ns() // 1_000_000,
    )
    return error.model_dump_json().encode()


@pytest.mark.integration
async def test_replay_reads_every_event_up_to_the_end_whatever_their_timestamps(
    settings: ServiceSettings,
) -> None:
    # 301 events in one partition, more than one fetch hands over on Tansu; in the middle, one
    # stamped ten minutes ahead (a producer with a fast clock), which once ended the scan there.
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    ahead_ms = time.time_ns() // 1_000_000 + 600_000
    try:
        sent = []
        for i in range(301):
            stamp = ahead_ms if i == 150 else None
            sent.append(
                await producer.send(
                    settings.errors_topic, error_event(f"e-{i}"), partition=0, timestamp_ms=stamp
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    out = await run_replay(settings, Selection(), dry_run=True, include_expired=True)

    assert out.strip().endswith(
        "301 error events read of 301 expected, 301 selected: would replay 301"
    )
    listed = {line.split()[2] for line in out.splitlines() if line.startswith("would replay")}
    assert listed == {f"e-{i}" for i in range(301)}


@pytest.mark.integration
async def test_a_request_whose_record_expired_is_replayed_only_when_asked(
    settings: ServiceSettings,
) -> None:
    # An error whose record is gone: it may have been replayed and succeeded since; nothing
    # left in Redis says so.
    await produce(
        settings.kafka_bootstrap_servers, settings.errors_topic, [(b"gone", error_event("gone"))]
    )

    out = await run_replay(settings, Selection())
    assert "skip (record expired: not replayed)" in out and "gone" in out
    assert "replayed 0; skipped 1 record expired: not replayed" in out
    assert await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1, 2) == []

    out = await run_replay(settings, Selection(), include_expired=True)
    assert "replayed 1" in out
    [published] = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1)
    assert decode(published, LLMRequest).request_id == "gone"


def test_times_are_iso_8601_or_epoch_milliseconds() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000  # UTC when it does not say
    with pytest.raises(ReplayError, match="neither an ISO 8601 time"):
        parse_time("yesterday")
