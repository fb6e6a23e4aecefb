"""A request task that ends without settling its claim, in a worker that lives on, gives the
claim back: another worker takes the request at once instead of waiting for the lease to end."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from llmstream.devtools.simulator import SimulatorServer
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import rig, sim, worker_settings

__all__ = ["sim"]  # the module's provider simulator fixture


async def test_a_cancelled_request_frees_its_claim_for_another_worker_at_once(
    services: Services, sim: SimulatorServer
) -> None:
    # A long lease: without the give-back, the second worker would wait for it (and count so).
    settings = worker_settings(services.redis_url, lease_ms=120_000)
    other = settings.model_copy(update={"worker_id": f"{settings.worker_id}-b"})
    rid = f"req-{uuid.uuid4().hex}"
    async with rig(sim, settings) as a, rig(sim, other) as b:
        await a.script(rid, {"status": 200, "delay_ms": 600_000})  # answers only once cancelled
        task = asyncio.create_task(a.process(request(rid, text="given back")))
        async with asyncio.timeout(60):  # a bound for a broken run, not a measurement
            while not await a.calls(rid):
                await asyncio.sleep(0.02)
        task.cancel()  # not a drain: the worker lives on, its heartbeat with it
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not a.dedup.draining

        await b.process(request(rid, text="given back"))

        [response] = b.responses()
        assert (response.request_id, response.content) == (rid, "echo: given back")
        assert a.responses() == [] and a.errors() == []
        # b claimed it outright: it neither waited for a's claim nor took it over.
        assert b.sample("llmstream_dedup_total", outcome="claimed") == 1
        assert b.sample("llmstream_dedup_total", outcome="waited") == 0
        assert b.sample("llmstream_dedup_total", outcome="takeover") == 0


async def test_a_drain_leaves_the_claim_to_the_lease_it_resigns(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(services.redis_url, lease_ms=120_000)
    rid = f"req-{uuid.uuid4().hex}"
    async with rig(sim, settings) as a:
        await a.script(rid, {"status": 200, "delay_ms": 600_000})
        task = asyncio.create_task(a.process(request(rid, text="drained")))
        async with asyncio.timeout(60):
            while not await a.calls(rid):
                await asyncio.sleep(0.02)
        a.dedup.draining = True  # the worker's drain: it resigns the whole lease afterwards
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stored = await a.dedup.records.get(rid)
        assert stored is not None and stored.state == "claimed"  # held until the resign
