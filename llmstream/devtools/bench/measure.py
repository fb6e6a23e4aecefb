"""Reading a scenario's results: output topics, the workers' /metrics, and the arithmetic."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.processes import WorkerProcess


@dataclass
class Outcomes:
    """What the worker(s) put on the output topics for one scenario.

    ``timings`` holds, per response: ``picked_up_ms`` and ``sent_ms`` (ms since the epoch),
    ``e2e_ms`` (created to sent), ``store_ms`` (completed_at_ms to the record's timestamp) and
    ``latency_ms`` (provider time, retries included).
    """

    responses: int = 0
    unique_responses: int = 0
    errors: int = 0
    unique_outcomes: int = 0
    duplicate_outputs: int = 0
    timings: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def window_s(self) -> float:
        """From the first request picked up to the last response sent."""
        picked_up, sent = self.timings["picked_up_ms"], self.timings["sent_ms"]
        if not picked_up or not sent:
            return math.nan
        return max(1, max(sent) - min(picked_up)) / 1000


async def _read_topic(
    bootstrap: str, topic: str, expected: int, idle_s: float, within_s: float
) -> list[Any]:
    """Every record of ``topic`` from the start: until ``expected`` came, or idle, or timeout."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        await consumer._client.force_metadata_update()
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + within_s
        last_data = time.monotonic()
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
            got = [r for rs in batch.values() for r in rs]
            if got:
                records.extend(got)
                last_data = time.monotonic()
            elif time.monotonic() - last_data > idle_s:
                break
    finally:
        await consumer.stop()
    return records


async def read_outcomes(settings: ServiceSettings, ids: set[str]) -> Outcomes:
    """Responses and errors for ``ids`` on ``settings``' output topics."""
    bootstrap = settings.kafka_bootstrap_servers
    responses = await _read_topic(
        bootstrap, settings.responses_topic, len(ids), idle_s=5, within_s=120
    )
    errors = await _read_topic(bootstrap, settings.errors_topic, 1, idle_s=1.5, within_s=10)
    out = Outcomes(responses=len(responses), errors=len(errors))
    t = out.timings
    seen: Counter[str] = Counter()
    for record in responses:
        body = orjson.loads(record.value)
        request_id = body["request_id"]
        seen[request_id] += 1
        if seen[request_id] > 1:
            continue
        created, queue_ms = body.get("created_at_ms"), body.get("queue_ms")
        if created is not None and queue_ms is not None:
            t["picked_up_ms"].append(created + queue_ms)
        # The record's timestamp is when the worker handed the response to its producer, after
        # storing it in Redis; completed_at_ms is stamped just before that.
        completed = body.get("completed_at_ms")
        sent = record.timestamp if record.timestamp and record.timestamp > 0 else completed
        if completed is not None:
            t["store_ms"].append(sent - completed)
        t["latency_ms"].append(body.get("latency_ms", 0))
        t["sent_ms"].append(sent)
        if created is not None:
            t["e2e_ms"].append(sent - created)
    error_ids = {orjson.loads(r.value).get("request_id") for r in errors}
    out.unique_responses = len(seen)
    out.duplicate_outputs = sum(n - 1 for n in seen.values())
    out.unique_outcomes = len((set(seen) | error_ids) & ids)
    return out


@dataclass(frozen=True)
class CallCount:
    """Provider calls the simulator counted for a scenario's request IDs."""

    calls: int
    unique_ids: int
    called_twice: int
    never_called: int

    @property
    def per_id(self) -> float:
        return self.calls / self.unique_ids if self.unique_ids else math.nan

    @classmethod
    def of(cls, stats: dict[str, Any], ids: set[str]) -> CallCount:
        """From the simulator's ``/_sim/stats``: the calls made for ``ids``."""
        by_id: dict[str, int] = stats["calls_by_request_id"]
        mine = {k: v for k, v in by_id.items() if k in ids}
        return cls(
            calls=sum(mine.values()),
            unique_ids=len(ids),
            called_twice=sum(1 for v in mine.values() if v > 1),
            never_called=len(ids) - len(mine),
        )


# --- the worker's own metrics ----------------------------------------------------------------


@dataclass
class Scrape:
    """The figures read from one worker's /metrics."""

    finished: float = 0.0  # success + error + expired outcomes
    in_flight: float = 0.0
    overhead: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    def __add__(self, other: Scrape) -> Scrape:
        buckets = dict(self.overhead)
        for le, n in other.overhead.items():
            buckets[le] = buckets.get(le, 0.0) + n
        return Scrape(self.finished + other.finished, self.in_flight + other.in_flight, buckets)


async def scrape(session: aiohttp.ClientSession, worker: WorkerProcess) -> Scrape:
    async with session.get(worker.url("/metrics")) as response:
        text = await response.text()
    result = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmstream_requests_total":
                if sample.labels.get("status") in ("success", "error", "expired"):
                    result.finished += sample.value
            elif sample.name == "llmstream_in_flight_requests":
                result.in_flight += sample.value
            elif sample.name == "llmstream_worker_overhead_seconds_bucket":
                result.overhead[float(sample.labels["le"])] = sample.value
    return result


async def scrape_all(session: aiohttp.ClientSession, workers: Sequence[WorkerProcess]) -> Scrape:
    total = Scrape()
    for worker in workers:
        total = total + await scrape(session, worker)
    return total


def bucket_delta(after: Scrape, before: Scrape) -> dict[float, float]:
    return {le: n - before.overhead.get(le, 0.0) for le, n in after.overhead.items()}


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' estimate: linear within the bucket holding the q-th observation (seconds)."""
    bounds = sorted(buckets)
    if not bounds:
        return math.nan
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: report its bound
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


async def wait_finished(
    workers: Sequence[WorkerProcess], total: int, within_s: float
) -> list[float]:
    """Poll the workers' /metrics until ``total`` outcomes; returns the in-flight samples."""
    deadline = time.monotonic() + within_s
    in_flight: list[float] = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for w in workers:
                if w.child.exited:
                    raise RuntimeError(f"{w.name} died; log:\n{w.child.log_tail()}")
            current = await scrape_all(session, workers)
            if current.finished >= total and current.in_flight == 0:
                return in_flight
            if current.finished < total * 0.95:  # the tail of a drain runs out of work
                in_flight.append(current.in_flight)
            # Each scrape costs the measured worker CPU (it renders every series): once a
            # second, not four times (which was about 1 % of its CPU in scenario 1).
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the workers did not finish {total} requests within {within_s:.0f} s")


@dataclass
class Figures:
    """Every number a scenario produced, by name (what --json writes)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key, math.nan)

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value


def arrival_bursts(picked_up_ms: Sequence[int], gap_ms: int = 50) -> tuple[float, float]:
    """Median size of, and median time between, the bursts in which requests were picked up.

    A fetch hands the worker everything that arrived since the previous one; on Tansu each fetch
    waits about 750 ms (Tansu holds each fetch for about half of ``fetch_max_wait_ms`` even when
    data is ready), so requests produced evenly arrive in bursts.
    """
    times = sorted(picked_up_ms)
    if not times:
        return math.nan, math.nan
    starts, sizes = [times[0]], [1]
    for previous, current in itertools.pairwise(times):
        if current - previous > gap_ms:
            starts.append(current)
            sizes.append(0)
        sizes[-1] += 1
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return percentile(sizes, 0.5), percentile(gaps, 0.5)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
