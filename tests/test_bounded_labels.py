"""Metric labels whose values come from events stay few, whatever the events say: one producer
must not be able to grow every Prometheus that scrapes the workers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest_asyncio

from llmstream.devtools.simulator import SimulatorServer
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import Rig, rig, sim, worker_settings

__all__ = ["sim"]  # the module's provider simulator fixture


@pytest_asyncio.fixture
async def pipeline(services: Services, sim: SimulatorServer) -> AsyncIterator[Rig]:
    async with rig(sim, worker_settings(services.redis_url, max_attempts=1)) as r:
        yield r


def _series(r: Rig, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in r.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


async def test_300_made_up_providers_make_a_bounded_number_of_series(pipeline: Rig) -> None:
    run = uuid.uuid4().hex[:8]
    for i in range(300):
        await pipeline.process(request(f"lbl-{run}-{i}", model=f"p{i}/m"))

    errors = pipeline.errors()
    assert len(errors) == 300  # each one answered: an unknown provider is the request's error
    requests = _series(pipeline, "llmstream_requests_total")
    assert sum(pipeline.sample("llmstream_requests_total", **labels) for labels in requests) == 300
    # Only configured providers name a series; every made-up one is "other".
    assert {labels["provider"] for labels in requests} == {"other"}
    assert len(requests) == 1
    assert {labels["error_type"] for labels in _series(pipeline, "llmstream_errors_total")} == {
        "invalid_request"
    }


async def test_configured_providers_keep_their_own_label(pipeline: Rig) -> None:
    run = uuid.uuid4().hex[:8]
    await pipeline.process(request(f"ok-{run}", model="openai/gpt-4o-mini"))
    await pipeline.process(request(f"none-{run}", model="no-provider-named"))

    providers = {labels["provider"] for labels in _series(pipeline, "llmstream_requests_total")}
    assert providers == {"openai", "unknown"}
