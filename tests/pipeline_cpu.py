"""CPU per request of the worker's request path alone: decode, claim, traffic control, the
outcome built, stored and handed over, metrics, with a provider that answers at once, real
Redis (``REDIS_URL``, or the project's own), and an emitter that acknowledges at once, so
neither HTTP nor Kafka is in the figure. It moves by a few percent between runs on a shared VM
but far less than ``llmstream bench``, so it tells a step of 5 µs from noise over a few runs.

    .venv/bin/python -m tests.pipeline_cpu --requests 20000

Run it pinned to one core (``taskset -c 0``) beside nothing else; three rounds are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Iterator

import uvloop

from llmstream.devtools.bench.rig import request_event
from llmstream.devtools.embedded import EmbeddedServices
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.providers import Completion
from llmstream.processors.worker import _tune_gc
from llmstream.schemas.models import LLMRequest
from tests.inprocess import SOURCE, Rig, rig, worker_settings

IN_FLIGHT = 500


async def measure(redis_url: str, requests: int, rounds: int) -> None:
    # The simulator only gives the router a reachable URL: the provider's call is replaced.
    async with (
        SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=1)) as sim,
        rig(sim, worker_settings(redis_url)) as r,
    ):
        answer = Completion("The number is prime.", "stop", 20, 12, 32, "openai", "gpt-4o-mini")

        async def complete(request: LLMRequest, model: str) -> Completion:
            await asyncio.sleep(0)  # an answer comes back on a later turn of the loop
            return answer

        provider = r.router.get("openai")
        assert provider is not None
        provider.complete = complete  # type: ignore[method-assign]

        async def beat() -> None:
            while True:
                await r.dedup.heartbeat()
                await asyncio.sleep(1)

        heartbeat = asyncio.create_task(beat())
        _tune_gc()
        for _ in range(rounds):
            run = uuid.uuid4().hex
            events = iter(
                [request_event(f"{run}-{i}", f"One fact about {i}.")[1] for i in range(requests)]
            )

            r.emitter.outputs.clear()
            started = time.process_time()
            await asyncio.gather(*(_drain(r, events) for _ in range(IN_FLIGHT)))
            spent = time.process_time() - started
            assert len(r.emitter.outputs) == 2 * requests  # a response and a metric each
            print(f"request path: {spent / requests * 1e6:.1f} µs of CPU per request")
        heartbeat.cancel()


async def _drain(r: Rig, events: Iterator[bytes]) -> None:
    """One in-flight slot: the next event, until none is left."""
    for raw in events:
        await r.processor.process(raw, None, SOURCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with EmbeddedServices.from_env() as services:
        assert services.redis_url
        uvloop.run(measure(services.redis_url, args.requests, args.rounds))


if __name__ == "__main__":
    main()
