"""CPU per non-streamed provider call, over aiohttp and over the worker's connection pool: the
OpenAI adapter calling the simulator (a child process, on another CPU where there is one), 200
calls in flight, nothing else in the process.

    taskset -c 0 .venv/bin/python -m tests.http_cpu --calls 20000

Each round prints both transports, measured one after the other; compare within a round, as
the machine's own speed moves between rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from pydantic import SecretStr

from llmstream.devtools.bench.rig import request_event
from llmstream.devtools.processes import ChildProcess, free_port
from llmstream.processors.providers import create_http_client
from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.providers.pool import ConnectionPool
from llmstream.schemas.codec import decode_request

IN_FLIGHT = 200


async def measure(url: str, calls: int, pooled: bool) -> float:
    """Microseconds of CPU per call."""
    requests = iter(
        [decode_request(request_event(f"cpu-{i}", f"One fact about {i}.")[1]) for i in range(calls)]
    )
    http = create_http_client(timeout_s=60, max_connections=IN_FLIGHT)
    pool = ConnectionPool(limit=IN_FLIGHT, connect_timeout_s=60, read_timeout_s=60)
    adapter = OpenAICompatible(
        "openai", http, f"{url}/v1", SecretStr("sk-cpu"), pool=pool if pooled else None
    )

    async def slot() -> None:
        for request in requests:
            await adapter.complete(request, "gpt-4o-mini")

    try:
        started = time.process_time()
        await asyncio.gather(*(slot() for _ in range(IN_FLIGHT)))
        return (time.process_time() - started) / calls * 1e6
    finally:
        await http.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "llmstream.cli", "simulate", "--port", str(port)]
    command += ["--latency-ms", "5"]
    others = frozenset(range(1, os.cpu_count() or 1)) or None
    log = Path(tempfile.gettempdir()) / f"http-cpu-simulator-{port}.log"
    simulator = ChildProcess("simulator", command, log, dict(os.environ), others).start()
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(simulator.wait_http(f"{url}/_sim/stats", 30))
        for _ in range(args.rounds):
            over_aiohttp = uvloop.run(measure(url, args.calls, pooled=False))
            over_pool = uvloop.run(measure(url, args.calls, pooled=True))
            print(f"aiohttp: {over_aiohttp:.1f} µs of CPU per call; pool: {over_pool:.1f} µs")
    finally:
        simulator.stop()


if __name__ == "__main__":
    main()
