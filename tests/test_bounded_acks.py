"""A request that stays unfinished at the head of its partition holds up the commit of every
later one; the worker stops reading that partition once it holds too many finished events behind
it, and reads on once the head finishes. Real worker process, broker, Redis and simulator."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from tests import harness


def _gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match.group(1))


async def test_a_partition_is_paused_behind_an_unfinished_head_and_resumed_after_it(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    limit = 10
    head = harness.request(f"head-{unique}")
    first = [harness.request(f"first-{unique}-{i}") for i in range(30)]
    later = [harness.request(f"later-{unique}-{i}") for i in range(20)]
    # One key for all: one partition, in this order.
    key = f"one-partition-{unique}".encode()

    def events(requests: list) -> list[tuple[bytes | None, bytes]]:  # type: ignore[type-arg]
        return [(key, value) for _, value in harness.request_events(requests)]

    async with harness.running_worker(
        settings,
        simulator.url,
        f"g-{unique}",
        tmp_path,
        LLMSTREAM_MAX_PENDING_ACKS_PER_PARTITION=str(limit),
    ) as worker:
        # The head's call takes seconds; the others answer at once.
        await harness.simulator_call(
            simulator,
            "POST",
            "/_sim/script",
            {"request_id": head.request_id, "responses": [{"status": 200, "delay_ms": 8000}]},
        )
        bootstrap, topic = settings.kafka_bootstrap_servers, settings.requests_topic
        await harness.produce(bootstrap, topic, events([head, *first]))
        async with httpx.AsyncClient() as client:
            paused = 0.0
            for _ in range(200):
                text = (await client.get(worker.url("/metrics"))).text
                paused = _gauge(text, "llmstream_paused_partitions")
                if paused:
                    break
                await asyncio.sleep(0.05)
            assert paused == 1.0, worker.log()[-3000:]
            assert _gauge(text, "llmstream_held_acks") > limit

            await harness.produce(bootstrap, topic, events(later))
            # While the partition is paused, nothing produced after the pause is called.
            while paused:
                calls = await harness.provider_calls(simulator)
                text = (await client.get(worker.url("/metrics"))).text
                paused = _gauge(text, "llmstream_paused_partitions")
                if paused:
                    assert not any(r.request_id in calls for r in later)
                await asyncio.sleep(0.2)

            answers = await harness.read_answers(settings, 1 + len(first) + len(later))
            text = (await client.get(worker.url("/metrics"))).text
    expected = {r.request_id for r in [head, *first, *later]}
    assert {a.request_id for a in answers} == expected  # nothing lost
    calls = await harness.provider_calls(simulator)
    assert {rid: calls.get(rid) for rid in expected} == dict.fromkeys(expected, 1)
    assert _gauge(text, "llmstream_paused_partitions") == 0.0
