"""Time to first chunk through the whole pipeline: a request produced to ``llm-requests`` → its
first chunk consumed from ``llm-response-chunks``, through a real ``llmstream worker`` process,
the embedded broker (or ``KAFKA_BOOTSTRAP_SERVERS``) and Redis, and the provider simulator.

    .venv/bin/python -m tests.first_chunk_latency --requests 40 --latency-ms 200

Requests go one at a time (each measures an idle pipeline), a random pause of up to a second
apart (so they do not all meet the consumers' fetch cycles in one phase). Printed: time to first
chunk and to the final response, the worker's own share (pick-up → first chunk handed to its
producer, from its ``llmstream_worker_first_chunk_seconds``; the simulator's latency included),
and the chunk's own hop to the consumer. The embedded Tansu broker holds every fetch for about
half the consumer's fetch wait even when data is ready (aiokafka's 0.5 s): that wait, not
llmstream, is most of the figure on Tansu; on Apache Kafka the same hop takes milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llmstream.devtools.embedded import EmbeddedServices, create_topics
from llmstream.devtools.processes import WorkerProcess, scoped_settings, topic_names, worker_env
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import LLMResponse, LLMResponseChunk
from tests.samples import request


def quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=10) if len(ordered) > 1 else ordered * 9
    return (
        f"p50 {statistics.median(ordered) * 1000:6.0f} ms   p90 {cuts[8] * 1000:6.0f} ms   "
        f"max {ordered[-1] * 1000:6.0f} ms"
    )


async def worker_first_chunk_mean(worker: WorkerProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(worker.url("/metrics")) as answer:
        text = await answer.text()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "llmstream_worker_first_chunk_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total / count if count else float("nan")


async def measure(args: argparse.Namespace, bootstrap: str, redis_url: str, embedded: bool) -> None:
    name = f"ttfc-{uuid.uuid4().hex[:8]}"
    settings = scoped_settings(bootstrap, redis_url, name, idempotent_producer=not embedded)
    chunks_topic = f"{name}-llm-response-chunks"
    await create_topics(bootstrap, [*topic_names(settings), chunks_topic], partitions=4)
    sim_settings = SimulatorSettings(
        port=0,
        latency_ms=args.latency_ms,
        latency_jitter=0,
        stream_chunks=8,
        stream_chunk_delay_ms=args.chunk_delay_ms,
    )
    workdir = Path(tempfile.mkdtemp(prefix="llmstream-ttfc-"))
    async with SimulatorServer(sim_settings) as sim:
        env = worker_env(
            settings,
            sim.url,
            f"{name}-group",
            extra={
                "LLMSTREAM_CHUNKS_TOPIC": chunks_topic,
                "LLMSTREAM_CONSUMER_LAG_INTERVAL_S": "0",
            },
        )
        worker = await asyncio.to_thread(WorkerProcess(env, workdir).start)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        try:
            await worker.wait_ready()
            await consumer.start()
            await producer.start()
            tps = [
                TopicPartition(topic, partition)
                for topic in (chunks_topic, settings.responses_topic)
                for partition in range(4)
            ]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            first_chunk, response_s, hop = [], [], []
            rng = random.Random(7)
            for i in range(args.requests + 1):  # the first warms the pipeline up; not counted
                await asyncio.sleep(rng.uniform(0, 1))
                rid = f"{name}-{i}"
                event = encode(request(rid, text=f"question {i}: " + "word " * 12, stream=True))
                started = time.perf_counter()
                await producer.send_and_wait(settings.requests_topic, event, key=rid.encode())
                chunk_at = done_at = None
                while chunk_at is None or done_at is None:
                    batch = await consumer.getmany(timeout_ms=100)
                    now = time.perf_counter()
                    for tp, records in batch.items():
                        for record in records:
                            if tp.topic == chunks_topic:
                                chunk = decode(record.value, LLMResponseChunk)
                                if chunk.request_id == rid and chunk_at is None:
                                    chunk_at = now
                                    hop.append(time.time() - chunk.created_at_ms / 1000)
                            elif decode(record.value, LLMResponse).request_id == rid:
                                done_at = now
                if i:
                    first_chunk.append(chunk_at - started)
                    response_s.append(done_at - started)
            in_worker = await worker_first_chunk_mean(worker)
        finally:
            await producer.stop()
            await consumer.stop()
            await asyncio.to_thread(worker.stop)

    print(
        f"{args.requests} streamed requests, one at a time; simulator latency "
        f"{args.latency_ms:g} ms, 8 pieces {args.chunk_delay_ms:g} ms apart; "
        f"broker: {'embedded Tansu' if embedded else bootstrap}"
    )
    print(f"  produce → first chunk consumed   {quantiles(first_chunk)}")
    print(f"  produce → final response         {quantiles(response_s)}")
    print(f"  worker pick-up → first chunk     mean {in_worker * 1000:6.0f} ms (incl. latency)")
    print(f"  chunk produced → consumed        {quantiles(hop)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="simulator's (200)")
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0, help="between pieces (20)")
    args = parser.parse_args()
    with EmbeddedServices.from_env() as services:
        assert services.kafka_bootstrap_servers and services.redis_url
        asyncio.run(
            measure(
                args,
                services.kafka_bootstrap_servers,
                services.redis_url,
                services.embedded_broker,
            )
        )


if __name__ == "__main__":
    main()
