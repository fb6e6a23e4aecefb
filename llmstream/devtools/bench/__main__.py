"""The bare loop (scenario 2), as the bench's child process:

``python -m llmstream.devtools.bench bare-loop URL N IN_FLIGHT ID_PREFIX OUT_JSON``

A hand-written asyncio + aiohttp client making the same calls as the worker, with nothing else
(no Kafka, no Redis, no dedup): what one Python core can do at best. It writes its figures to
``OUT_JSON``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

from llmstream.devtools.bench.cpu import peak_rss_bytes
from llmstream.devtools.bench.rig import request_ids


async def bare_loop(url: str, n: int, in_flight: int, id_prefix: str) -> dict[str, float | int]:
    """A hand-written asyncio client: build the body, POST it, parse the answer. Nothing else."""
    ids = iter(enumerate(request_ids(id_prefix, n)))
    ok = failed = 0
    headers = {
        "content-type": "application/json",
        "authorization": "Bearer sk-bench-not-a-real-key",
    }

    async def one_slot(session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed
        for i, request_id in ids:
            body = orjson.dumps(
                {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "You answer in one short sentence."},
                        {"role": "user", "content": f"Tell me one fact about the number {i}."},
                    ],
                }
            )
            async with session.post(
                url, data=body, headers={**headers, "x-client-request-id": request_id}
            ) as response:
                data = orjson.loads(await response.read())
            if response.status == 200 and data["choices"][0]["message"]["content"]:
                ok += 1
            else:
                failed += 1

    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_slot(session) for _ in range(in_flight)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "ok": ok,
        "failed": failed,
        "cpu_s": cpu,
        "wall_s": wall,
        "peak_rss_bytes": peak_rss_bytes(os.getpid()),
    }


def main(argv: Sequence[str]) -> int:
    url, n, in_flight, prefix, out = argv
    result = asyncio.run(bare_loop(url, int(n), int(in_flight), prefix))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bare-loop":
        sys.exit(main(sys.argv[2:]))
    sys.exit("usage: llmstream bench (this module's own entry point is the bare loop's child)")
