"""``llmstream bench``: throughput per core, CPU per request and overhead, against the bare loop.

Everything runs as separate processes on this machine: the broker and Redis (embedded, or those
named by ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``), the provider simulator, and each worker as
``python -m llmstream.cli worker``. Where the OS allows, the worker (and the bare loop) run pinned
to the first CPU and everything else to the others, so "one core" means one core.

Scenarios (each on its own topics, consumer group and Redis key prefix):

1. backlog drain: N requests are on the requests topic before one worker starts;
2. the bare loop: a plain asyncio + aiohttp client making the same N calls with the same number
   in flight, no Kafka, no Redis, no dedup: what one Python core can do at best;
3. steady load at half of scenario 1's throughput: overhead and consumer lag over time;
4. scale-out: two workers in one group drain the same backlog;
5. traffic control: goodput at a provider's rate limit, and adaptation to a limit lower than
   configured, time x10 (``llmstream bench-traffic`` runs them in real time, with the circuit
   breaker's scenario).

How each figure is measured is printed in the table itself. Nothing here asserts: the targets are
printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llmstream.devtools.embedded import EmbeddedServices, create_topics, free_port
from llmstream.schemas.codec import encode
from llmstream.schemas.models import ChatMessage, LLMRequest

ALL_SCENARIOS = (1, 2, 3, 4, 5)
MODEL = "openai/gpt-4o-mini"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
SESSION_TIMEOUT_S = 6  # Kafka's minimum; Tansu holds a group join for half of it
SETTLE_S = SESSION_TIMEOUT_S


@dataclass(frozen=True)
class BenchOptions:
    """What ``llmstream bench`` was asked to run."""

    requests: int = 30_000
    latency_ms: float = 200.0
    latency_jitter: float = 0.2
    in_flight: int = 500
    steady_seconds: float = 60.0
    partitions: int = 4
    scenarios: tuple[int, ...] = ALL_SCENARIOS
    json_path: Path | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """A smoke run: fewer requests and a shorter steady load."""
        return cls(**{"requests": 5_000, "steady_seconds": 15.0, **overrides})


def bench_options(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from ``llmstream bench``'s arguments; ``--quick`` changes the defaults."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("requests", args.requests),
            ("latency_ms", args.latency_ms),
            ("in_flight", args.in_flight),
            ("steady_seconds", args.steady_seconds),
            ("partitions", args.partitions),
            ("json_path", args.json),
        )
        if value is not None
    }
    if args.scenarios:
        try:
            wanted = tuple(sorted({int(part) for part in args.scenarios.split(",") if part}))
        except ValueError:
            raise SystemExit(
                f"--scenarios: expected numbers like 1,2,3, got {args.scenarios!r}"
            ) from None
        if not wanted or not set(wanted) <= set(ALL_SCENARIOS):
            raise SystemExit(f"--scenarios: choose from {ALL_SCENARIOS}, got {args.scenarios!r}")
        overrides["scenarios"] = wanted
    return BenchOptions.quick(**overrides) if args.quick else BenchOptions(**overrides)


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the measured process gets and which the rest of the system gets."""

    worker: frozenset[int] | None
    others: frozenset[int] | None
    second_worker: frozenset[int] | None

    @classmethod
    def detect(cls) -> Placement:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux: no pinning
            return cls(None, None, None)
        if len(cpus) < 2:
            return cls(None, None, None)
        first, rest = frozenset(cpus[:1]), frozenset(cpus[1:])
        return cls(first, rest, frozenset(cpus[1:2]))

    def describe(self) -> str:
        if self.worker is None or self.others is None:
            return "not pinned (fewer than two CPUs, or no sched_setaffinity on this OS)"
        return (
            f"worker and bare loop pinned to CPU {_cpus(self.worker)}; simulator, broker, Redis "
            f"and this driver pinned to CPU {_cpus(self.others)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        # Between fork and exec: die with the driver, and pin before any thread exists, so every
        # thread the child ever starts inherits the CPU set.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def pin_process(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of a running process (affinity is per thread on Linux)."""
    if cpus is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all CPUs), from /proc/stat."""
    return sum(cpu_busy_seconds().values())


def cpu_busy_seconds() -> dict[int, float]:
    """CPU seconds spent on each CPU by everything on the machine, from /proc/stat."""
    busy: dict[int, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            fields = [int(x) for x in values]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy[int(name[3:])] = (sum(fields[:8]) - idle) / _CLK_TCK
    return busy


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: its peak resident set."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Child:
    """A child process of the driver, in its own working directory, dying with the driver."""

    name: str
    args: list[str]
    env: dict[str, str]
    workdir: Path
    cpus: frozenset[int] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.args,
            env=self.env,
            cwd=self.workdir,  # faust writes its data directory into the working directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(self.cpus),
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 40.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


async def _wait_http(url: str, within_s: float, child: Child, ok: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if child.process is not None and child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited at start; log:\n{child.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if ok(response.status):
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready within {within_s:.0f} s; log:\n{child.log_tail()}")


# --- the system under test -------------------------------------------------------------------


@dataclass
class Topics:
    requests: str
    responses: str
    metrics: str
    errors: str

    @classmethod
    def named(cls, prefix: str) -> Topics:
        return cls(
            f"{prefix}-llm-requests",
            f"{prefix}-llm-responses",
            f"{prefix}-llm-metrics",
            f"{prefix}-llm-errors",
        )

    def all(self) -> list[str]:
        return [self.requests, self.responses, self.metrics, self.errors]


@dataclass
class Rig:
    """The services every scenario shares: broker, Redis, simulator, and where logs go."""

    options: BenchOptions
    placement: Placement
    bootstrap: str
    redis_url: str
    simulator_url: str
    workdir: Path
    run_id: str
    service_pids: list[int] = field(default_factory=list)
    embedded_broker: bool = True

    def worker_env(self, topics: Topics, group: str, prefix: str, port: int) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LLMSTREAM_", "OPENAI_", "ANTHROPIC_"))
        }
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REDIS_URL=self.redis_url,
            LLMSTREAM_REDIS_KEY_PREFIX=prefix,
            LLMSTREAM_REQUESTS_TOPIC=topics.requests,
            LLMSTREAM_RESPONSES_TOPIC=topics.responses,
            LLMSTREAM_METRICS_TOPIC=topics.metrics,
            LLMSTREAM_ERRORS_TOPIC=topics.errors,
            LLMSTREAM_CONSUMER_GROUP=group,
            LLMSTREAM_MAX_IN_FLIGHT=str(self.options.in_flight),
            # Kafka's minimum session timeout; Tansu holds a group join for half of it.
            LLMSTREAM_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
            LLMSTREAM_HEARTBEAT_INTERVAL_S="1",
            LLMSTREAM_HTTP_HOST="127.0.0.1",
            LLMSTREAM_HTTP_PORT=str(port),
            LLMSTREAM_FAUST_DATADIR=str(self.workdir / f"faust-{group}"),
            OPENAI_BASE_URL=f"{self.simulator_url}/v1",
            OPENAI_API_KEY="sk-bench-not-a-real-key",
            ANTHROPIC_BASE_URL=self.simulator_url,
            ANTHROPIC_API_KEY="sk-ant-bench-not-a-real-key",
        )
        if self.embedded_broker:
            # Tansu cannot grant producer IDs (see PLATFORM.md); a real Kafka keeps the default.
            env["LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER"] = "false"
        return env

    def others_cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.service_pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    async def new_topics(self, scenario: str) -> Topics:
        topics = Topics.named(f"bench-{self.run_id}-{scenario}")
        await create_topics(self.bootstrap, topics.all(), self.options.partitions)
        return topics

    async def simulator(self, method: str, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.simulator_url}{path}") as response,
        ):
            response.raise_for_status()
            return orjson.loads(await response.read())

    def start_worker(self, name: str, topics: Topics, group: str, prefix: str, cpus: Any) -> Worker:
        port = free_port()
        child = Child(
            name,
            [sys.executable, "-m", "llmstream.cli", "worker"],
            self.worker_env(topics, group, prefix, port),
            self.workdir / name,
            cpus,
        ).start()
        return Worker(child, port)


@dataclass
class Worker:
    child: Child
    port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    async def wait_ready(self, within_s: float = 90.0) -> None:
        await _wait_http(
            f"http://127.0.0.1:{self.port}/ready", within_s, self.child, lambda s: s == 200
        )


def request_event(request_id: str, text: str) -> tuple[bytes, bytes]:
    """One request as a producer would write it (JSON, the worker's default format)."""
    request = LLMRequest(
        request_id=request_id,
        model=MODEL,
        messages=[
            ChatMessage(role="system", content="You answer in one short sentence."),
            ChatMessage(role="user", content=text),
        ],
        metadata={"source": "bench"},
        created_at_ms=time.time_ns() // 1_000_000,
    )
    return request_id.encode(), encode(request)


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )


async def fill_backlog(bootstrap: str, topic: str, ids: Sequence[str]) -> float:
    """Produce one request per ID and wait for the broker's acks; returns the seconds taken."""
    started = time.perf_counter()
    producer = _producer(bootstrap)
    await producer.start()
    try:
        pending = []
        for i, request_id in enumerate(ids):
            key, value = request_event(request_id, f"Tell me one fact about the number {i}.")
            pending.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# --- reading results -------------------------------------------------------------------------


@dataclass
class Outcomes:
    """What the worker(s) put on the output topics for one scenario."""

    responses: int = 0
    unique_responses: int = 0
    errors: int = 0
    unique_outcomes: int = 0
    duplicate_outputs: int = 0
    picked_up_ms: list[int] = field(default_factory=list)
    sent_ms: list[int] = field(default_factory=list)
    e2e_ms: list[int] = field(default_factory=list)
    store_ms: list[int] = field(default_factory=list)  # completed_at_ms to the record's timestamp
    latency_ms: list[int] = field(default_factory=list)  # provider time, retries included

    def window_s(self) -> float:
        """From the first request picked up to the last response sent."""
        if not self.picked_up_ms or not self.sent_ms:
            return math.nan
        return max(1, max(self.sent_ms) - min(self.picked_up_ms)) / 1000


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


async def read_outcomes(bootstrap: str, topics: Topics, ids: set[str]) -> Outcomes:
    responses = await _read_topic(bootstrap, topics.responses, len(ids), idle_s=5, within_s=120)
    errors = await _read_topic(bootstrap, topics.errors, 1, idle_s=1.5, within_s=10)
    out = Outcomes(responses=len(responses), errors=len(errors))
    seen: Counter[str] = Counter()
    for record in responses:
        body = orjson.loads(record.value)
        request_id = body["request_id"]
        seen[request_id] += 1
        if seen[request_id] > 1:
            continue
        created, queue_ms = body.get("created_at_ms"), body.get("queue_ms")
        if created is not None and queue_ms is not None:
            out.picked_up_ms.append(created + queue_ms)
        # The record's timestamp is when the worker handed the response to its producer, after
        # storing it in Redis; completed_at_ms is stamped just before that.
        completed = body.get("completed_at_ms")
        sent = record.timestamp if record.timestamp and record.timestamp > 0 else completed
        if completed is not None:
            out.store_ms.append(sent - completed)
        out.latency_ms.append(body.get("latency_ms", 0))
        out.sent_ms.append(sent)
        if created is not None:
            out.e2e_ms.append(sent - created)
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


async def count_calls(rig: Rig, ids: set[str]) -> CallCount:
    stats = await rig.simulator("GET", "/_sim/stats")
    by_id: dict[str, int] = stats["calls_by_request_id"]
    mine = {k: v for k, v in by_id.items() if k in ids}
    return CallCount(
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


async def scrape(session: aiohttp.ClientSession, worker: Worker) -> Scrape:
    async with session.get(worker.metrics_url) as response:
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


async def scrape_all(session: aiohttp.ClientSession, workers: Sequence[Worker]) -> Scrape:
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


async def wait_finished(workers: Sequence[Worker], total: int, within_s: float) -> list[float]:
    """Poll the workers' /metrics until ``total`` outcomes; returns the in-flight samples."""
    deadline = time.monotonic() + within_s
    in_flight: list[float] = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for w in workers:
                if w.child.process is not None and w.child.process.poll() is not None:
                    raise RuntimeError(f"{w.child.name} died; log:\n{w.child.log_tail()}")
            current = await scrape_all(session, workers)
            if current.finished >= total and current.in_flight == 0:
                return in_flight
            if current.finished < total * 0.95:  # the tail of a drain runs out of work
                in_flight.append(current.in_flight)
            await asyncio.sleep(0.25)
    raise TimeoutError(f"the workers did not finish {total} requests within {within_s:.0f} s")


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Figures:
    """Every number a scenario produced, by name (what --json writes)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key, math.nan)

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def drain_backlog(rig: Rig, scenario: str, worker_count: int) -> Figures:
    """Scenarios 1 and 4: N requests wait on the topic; ``worker_count`` workers drain them."""
    options = rig.options
    topics = await rig.new_topics(scenario)
    ids = _ids(f"{rig.run_id}-{scenario}", options.requests)
    await rig.simulator("POST", "/_sim/reset")
    if worker_count == 1:
        took = await fill_backlog(rig.bootstrap, topics.requests, ids)
        _say(f"{scenario}: {len(ids):,} requests on {topics.requests} in {took:.1f} s")
    group = f"bench-{rig.run_id}-{scenario}"
    prefix = f"bench:{rig.run_id}:{scenario}:"
    placement = rig.placement
    cpu_sets = [placement.worker, placement.second_worker][:worker_count]
    workers = [
        rig.start_worker(f"{scenario}-worker-{i + 1}", topics, group, prefix, cpus)
        for i, cpus in enumerate(cpu_sets)
    ]
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
        if worker_count > 1:
            # Workers that join one by one would rebalance in the middle of the drain (on Tansu
            # a join waits half the session timeout): let the group settle, then produce the
            # backlog, which takes well under a second, before the first fetch returns.
            await asyncio.sleep(SETTLE_S)
        async with aiohttp.ClientSession() as session:
            before = await scrape_all(session, workers)
        cpu_before = [cpu_seconds(w.child.pid) for w in workers]
        others_before = rig.others_cpu_seconds()
        busy_before = machine_busy_seconds()
        per_cpu_before = cpu_busy_seconds()
        driver_before = time.process_time()
        wall_before = time.perf_counter()
        if worker_count > 1:
            took = await fill_backlog(rig.bootstrap, topics.requests, ids)
            _say(f"{scenario}: {len(ids):,} requests on {topics.requests} in {took:.1f} s")
        in_flight = await wait_finished(
            workers, options.requests, within_s=max(300, options.requests / 50)
        )
        wall = time.perf_counter() - wall_before
        cpu = sum(cpu_seconds(w.child.pid) - c for w, c in zip(workers, cpu_before, strict=True))
        others = rig.others_cpu_seconds() - others_before
        busy = machine_busy_seconds() - busy_before
        per_cpu = {c: b - per_cpu_before.get(c, 0.0) for c, b in cpu_busy_seconds().items()}
        driver = time.process_time() - driver_before
        rss = max(peak_rss_bytes(w.child.pid) for w in workers)
        async with aiohttp.ClientSession() as session:
            after = await scrape_all(session, workers)
    finally:
        for w in workers:
            w.child.stop()
    outcomes = await read_outcomes(rig.bootstrap, topics, set(ids))
    calls = await count_calls(rig, set(ids))
    overhead = bucket_delta(after, before)
    window = outcomes.window_s()
    f = Figures()
    f["workers"] = worker_count
    f["requests"] = options.requests
    f["completed"] = outcomes.unique_responses
    f["window_s"] = window
    f["rps"] = outcomes.unique_responses / window
    f["worker_cpu_s"] = cpu
    f["cpu_s_per_1000"] = cpu / options.requests * 1000
    f["worker_busy"] = cpu / wall / worker_count
    f["others_busy"] = others / wall
    # Anything else: other processes, and the kernel's share of loopback networking.
    f["foreign_busy"] = max(0.0, busy - cpu - others - driver) / wall
    f["machine_busy"] = busy / wall
    f["cpu_busy"] = {f"cpu{c}": b / wall for c, b in sorted(per_cpu.items())}
    f["provider_p50_ms"] = percentile(outcomes.latency_ms, 0.5)
    f["mean_in_flight"] = _mean(in_flight)
    f["burst_size"], f["burst_interval_ms"] = arrival_bursts(outcomes.picked_up_ms)
    f["peak_rss_bytes"] = rss
    for q in (0.5, 0.95, 0.99):
        f[f"overhead_p{round(q * 100)}_ms"] = histogram_quantile(overhead, q) * 1000
    f["e2e_p50_ms"] = percentile(outcomes.e2e_ms, 0.5)
    f["e2e_p99_ms"] = percentile(outcomes.e2e_ms, 0.99)
    f["store_p50_ms"] = percentile(outcomes.store_ms, 0.5)
    f["calls_per_id"] = calls.per_id
    f["ids_called_twice"] = calls.called_twice
    f["lost"] = options.requests - outcomes.unique_outcomes
    f["errors"] = outcomes.errors
    f["duplicate_outputs"] = outcomes.duplicate_outputs
    return f


async def bare_loop(rig: Rig) -> Figures:
    """Scenario 2: the same N calls from a plain asyncio + aiohttp loop, on the worker's core."""
    options = rig.options
    ids = _ids(f"{rig.run_id}-s2", options.requests)
    await rig.simulator("POST", "/_sim/reset")
    out = rig.workdir / "s2-bare-loop.json"
    child = Child(
        "s2-bare-loop",
        [
            sys.executable,
            "-m",
            "llmstream.devtools.bench",
            "bare-loop",
            f"{rig.simulator_url}/v1/chat/completions",
            str(options.requests),
            str(options.in_flight),
            f"{rig.run_id}-s2",
            str(out),
        ],
        dict(os.environ),
        rig.workdir / "s2",
        rig.placement.worker,
    ).start()
    assert child.process is not None
    others_before = rig.others_cpu_seconds()
    returncode = await asyncio.to_thread(child.process.wait)
    others = rig.others_cpu_seconds() - others_before
    if returncode != 0:
        raise RuntimeError(f"the bare loop failed; log:\n{child.log_tail()}")
    result = json.loads(out.read_text())
    calls = await count_calls(rig, set(ids))
    f = Figures()
    f["requests"] = options.requests
    f["completed"] = result["ok"]
    f["window_s"] = result["wall_s"]
    f["rps"] = result["ok"] / result["wall_s"]
    f["cpu_s_per_1000"] = result["cpu_s"] / options.requests * 1000
    f["busy"] = result["cpu_s"] / result["wall_s"]
    f["others_busy"] = others / result["wall_s"]
    f["peak_rss_bytes"] = result["peak_rss_bytes"]
    f["calls_per_id"] = calls.per_id
    f["failed"] = result["failed"]
    return f


async def _bare_loop_main(
    url: str, n: int, in_flight: int, id_prefix: str
) -> dict[str, float | int]:
    """A hand-written asyncio client: build the body, POST it, parse the answer. Nothing else."""
    ids = iter(enumerate(_ids(id_prefix, n)))
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


async def steady_load(rig: Rig, rate: float) -> Figures:
    """Scenario 3: ``rate`` requests/s for ``steady_seconds``; overhead and lag over time."""
    options = rig.options
    topics = await rig.new_topics("s3")
    await rig.simulator("POST", "/_sim/reset")
    group = f"bench-{rig.run_id}-s3"
    worker = rig.start_worker(
        "s3-worker", topics, group, f"bench:{rig.run_id}:s3:", rig.placement.worker
    )
    produced_end: dict[int, int] = {}
    lag_samples: list[tuple[float, int]] = []
    snapshots: list[tuple[float, Scrape]] = []
    ids: list[str] = []
    # Reads the group's committed offsets (OffsetFetch) without joining the group.
    offsets = AIOKafkaConsumer(
        bootstrap_servers=rig.bootstrap, group_id=group, enable_auto_commit=False
    )
    producer = _producer(rig.bootstrap)
    try:
        await worker.wait_ready()
        await offsets.start()
        tps = [TopicPartition(topics.requests, p) for p in range(options.partitions)]
        offsets.assign(tps)
        await producer.start()
        session = aiohttp.ClientSession()
        try:
            snapshots.append((0.0, await scrape(session, worker)))
            cpu_before = cpu_seconds(worker.child.pid)
            others_before = rig.others_cpu_seconds()
            pending: list[asyncio.Future[Any]] = []

            def record(future: asyncio.Future[Any]) -> None:
                if not future.cancelled() and future.exception() is None:
                    meta = future.result()
                    produced_end[meta.partition] = max(
                        produced_end.get(meta.partition, 0), meta.offset + 1
                    )

            async def sample_lag(at: float) -> None:
                lag = 0
                for partition, end in produced_end.items():
                    done = await offsets.committed(TopicPartition(topics.requests, partition))
                    lag += max(0, end - (done or 0))
                lag_samples.append((at, lag))

            started = time.perf_counter()
            duration = options.steady_seconds
            next_sample = 1.0
            sent = 0
            while (now := time.perf_counter() - started) < duration:
                due = min(int(now * rate) + 1, int(duration * rate))
                while sent < due:
                    request_id = f"{rig.run_id}-s3-{sent:07d}"
                    key, value = request_event(request_id, f"Tell me one fact about {sent}.")
                    future = await producer.send(topics.requests, value, key=key)
                    future.add_done_callback(record)
                    pending.append(future)
                    ids.append(request_id)
                    sent += 1
                if now >= next_sample:
                    await sample_lag(now)
                    snapshots.append((now, await scrape(session, worker)))
                    next_sample += 1.0
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
            offered_wall = time.perf_counter() - started
            await wait_finished([worker], len(ids), within_s=120)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(worker.child.pid) - cpu_before
            others = rig.others_cpu_seconds() - others_before
            rss = peak_rss_bytes(worker.child.pid)
            final = await scrape(session, worker)
        finally:
            await session.close()
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await offsets.stop()
        worker.child.stop()
    outcomes = await read_outcomes(rig.bootstrap, topics, set(ids))
    calls = await count_calls(rig, set(ids))
    f = Figures()
    f["offered_rps"] = rate
    f["requests"] = len(ids)
    f["achieved_offered_rps"] = len(ids) / offered_wall
    f["completed"] = outcomes.unique_responses
    f["burst_size"], f["burst_interval_ms"] = arrival_bursts(outcomes.picked_up_ms)
    whole = bucket_delta(final, snapshots[0][1])
    for q in (0.5, 0.95, 0.99):
        f[f"overhead_p{round(q * 100)}_ms"] = histogram_quantile(whole, q) * 1000
    # Thirds of the load window, each from the histogram's change over it.
    thirds = []
    for k in range(3):
        lo, hi = options.steady_seconds * k / 3, options.steady_seconds * (k + 1) / 3
        first = min(snapshots, key=lambda s: abs(s[0] - lo))[1]
        last = min(snapshots, key=lambda s: abs(s[0] - hi))[1]
        delta = bucket_delta(last, first)
        thirds.append(
            {
                "p50_ms": histogram_quantile(delta, 0.5) * 1000,
                "p99_ms": histogram_quantile(delta, 0.99) * 1000,
                "lag_mean": _mean([lag for t, lag in lag_samples if lo <= t < hi]),
                "lag_max": max((lag for t, lag in lag_samples if lo <= t < hi), default=0),
            }
        )
    f["thirds"] = thirds
    f["lag_max"] = max((lag for _, lag in lag_samples), default=0)
    f["lag_samples"] = lag_samples
    f["cpu_s_per_1000"] = cpu / max(1, len(ids)) * 1000
    f["worker_busy"] = cpu / wall
    f["others_busy"] = others / wall
    f["peak_rss_bytes"] = rss
    f["e2e_p50_ms"] = percentile(outcomes.e2e_ms, 0.5)
    f["e2e_p99_ms"] = percentile(outcomes.e2e_ms, 0.99)
    f["store_p50_ms"] = percentile(outcomes.store_ms, 0.5)
    f["calls_per_id"] = calls.per_id
    f["ids_called_twice"] = calls.called_twice
    f["lost"] = len(ids) - outcomes.unique_outcomes
    f["errors"] = outcomes.errors
    f["duplicate_outputs"] = outcomes.duplicate_outputs
    return f


def arrival_bursts(picked_up_ms: Sequence[int], gap_ms: int = 50) -> tuple[float, float]:
    """Median size of, and median time between, the bursts in which requests were picked up.

    A fetch hands the worker everything that arrived since the previous one; on Tansu each fetch
    waits about 750 ms (see PLATFORM.md), so requests produced evenly arrive in bursts.
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# --- the report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _verdict(value: float, goal: float, higher_is_better: bool) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if higher_is_better:
        ok = value >= goal
        gap = value / goal - 1
    else:
        ok = value <= goal
        gap = goal / value - 1 if value else math.inf
    if ok:
        return "met"
    return (
        f"**missed** ({gap * 100:+.0f}%)"
        if higher_is_better
        else f"**missed** ({value / goal:.1f}x)"
    )


def _exact(value: float, goal: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "met" if value == goal else "**missed**"


@dataclass
class Table:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(
        self, scenario: str, figure: str, measured: str, target: str = "", status: str = ""
    ) -> None:
        self.rows.append((scenario, figure, measured, target, status))

    def render(self) -> str:
        lines = [
            "| scenario | figure (how it is measured) | measured | target | |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _mb(value: float) -> float:
    return value / 1e6


def build_table(results: dict[str, Figures], options: BenchOptions) -> Table:
    t = Table()
    s1, s2, s3, s4 = (results.get(k) for k in ("s1", "s2", "s3", "s4"))
    if s1 is not None:
        name = "1 backlog drain, 1 worker"
        t.add(
            name,
            "completed requests/s (first pick-up to last response sent)",
            _n(s1["rps"]),
            "≥ 1,500",
            _verdict(s1["rps"], 1500, True),
        )
        t.add(
            name,
            "worker CPU s per 1,000 requests (utime+stime, /proc)",
            _n(s1["cpu_s_per_1000"], 3),
            "≤ 0.600",
            _verdict(s1["cpu_s_per_1000"], 0.6, False),
        )
        t.add(name, "worker core busy (CPU s / wall s)", f"{s1['worker_busy'] * 100:.0f}%")
        t.add(
            name,
            f"requests in flight, mean (of {options.in_flight} allowed)",
            _n(s1["mean_in_flight"]),
        )
        t.add(
            name,
            "worker peak RSS (VmHWM)",
            f"{_mb(s1['peak_rss_bytes']):.0f} MB",
            "< 300 MB",
            _verdict(_mb(s1["peak_rss_bytes"]), 300, False),
        )
        t.add(
            name,
            "overhead p50 / p95 / p99 ms (in worker minus provider wait; histogram)",
            f"{_n(s1['overhead_p50_ms'], 1)} / {_n(s1['overhead_p95_ms'], 1)} / "
            f"{_n(s1['overhead_p99_ms'], 1)}",
        )
        t.add(
            name,
            "end-to-end p50 / p99 ms (created_at_ms to response sent; backlog wait incl.)",
            f"{_n(s1['e2e_p50_ms'])} / {_n(s1['e2e_p99_ms'])}",
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s1["calls_per_id"], 3),
            "1.000",
            _exact(round(s1["calls_per_id"], 6), 1.0),
        )
        t.add(
            name,
            "lost requests (no response and no error)",
            _n(s1["lost"]),
            "0",
            _exact(s1["lost"], 0),
        )
        t.add(
            name,
            "simulator + broker + Redis CPU (share of one core)",
            f"{s1['others_busy'] * 100:.0f}%",
        )
        t.add(name, "provider time p50 ms as the worker saw it", _n(s1["provider_p50_ms"]))
        t.add(
            name,
            "other load during the run (other processes, kernel networking)",
            f"{s1['foreign_busy'] * 100:.0f}% of one core",
        )
    if s2 is not None:
        name = "2 bare loop (aiohttp, same core)"
        t.add(name, "requests/s (same N, same in flight, same simulator)", _n(s2["rps"]))
        t.add(name, "CPU s per 1,000 requests", _n(s2["cpu_s_per_1000"], 3))
        t.add(name, "core busy (CPU s / wall s)", f"{s2['busy'] * 100:.0f}%")
        if s1 is not None:
            rps_ratio = s1["rps"] / s2["rps"]
            cpu_ratio = s1["cpu_s_per_1000"] / s2["cpu_s_per_1000"]
            t.add(
                name,
                "pipeline / bare loop, requests/s",
                f"{rps_ratio:.2f}",
                "≥ 0.50",
                _verdict(rps_ratio, 0.5, True),
            )
            t.add(name, "pipeline / bare loop, CPU per request", f"{cpu_ratio:.1f}x")
        t.add(
            name,
            "provider calls per unique ID",
            _n(s2["calls_per_id"], 3),
            "1.000",
            _exact(round(s2["calls_per_id"], 6), 1.0),
        )
    if s3 is not None:
        name = f"3 steady load, {options.steady_seconds:.0f} s"
        t.add(name, "offered requests/s (50% of scenario 1)", _n(s3["offered_rps"]))
        t.add(
            name,
            "requests reach the worker in bursts of (median) every (median) ms",
            f"{_n(s3['burst_size'])} every {_n(s3['burst_interval_ms'])}",
        )
        t.add(
            name,
            "overhead p50 / p95 / p99 ms (histogram)",
            f"{_n(s3['overhead_p50_ms'], 1)} / {_n(s3['overhead_p95_ms'], 1)} / "
            f"{_n(s3['overhead_p99_ms'], 1)}",
            "p99 ≤ 20",
            _verdict(s3["overhead_p99_ms"], 20, False),
        )
        thirds = s3["thirds"]
        t.add(
            name,
            "overhead p99 ms by third of the window (flat?)",
            " / ".join(_n(x["p99_ms"], 1) for x in thirds),
        )
        t.add(
            name,
            "consumer lag, mean by third (produced minus group's committed offsets)",
            " / ".join(_n(x["lag_mean"]) for x in thirds),
        )
        t.add(name, "consumer lag, max", _n(s3["lag_max"]))
        t.add(
            name,
            "end-to-end p50 / p99 ms (created_at_ms to response sent)",
            f"{_n(s3['e2e_p50_ms'])} / {_n(s3['e2e_p99_ms'])}",
        )
        t.add(name, "worker CPU s per 1,000 requests", _n(s3["cpu_s_per_1000"], 3))
        t.add(
            name,
            "worker peak RSS",
            f"{_mb(s3['peak_rss_bytes']):.0f} MB",
            "< 300 MB",
            _verdict(_mb(s3["peak_rss_bytes"]), 300, False),
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s3["calls_per_id"], 3),
            "1.000",
            _exact(round(s3["calls_per_id"], 6), 1.0),
        )
        t.add(name, "lost requests", _n(s3["lost"]), "0", _exact(s3["lost"], 0))
    if s4 is not None:
        name = "4 scale-out, 2 workers"
        t.add(
            name,
            "completed requests/s (2 workers, one per CPU, sharing with the services)",
            _n(s4["rps"]),
        )
        if s1 is not None:
            t.add(name, "speed-up over scenario 1", f"{s4['rps'] / s1['rps']:.2f}x")
        t.add(name, "workers' CPU s per 1,000 requests", _n(s4["cpu_s_per_1000"], 3))
        t.add(
            name,
            "CPUs busy, each (all processes)",
            " / ".join(f"{b * 100:.0f}%" for b in s4["cpu_busy"].values()),
        )
        t.add(
            name,
            "provider time p50 ms as the workers saw it (simulator on the shared CPU)",
            _n(s4["provider_p50_ms"]),
        )
        t.add(
            name,
            "of which other load (other processes, kernel networking)",
            f"{s4['foreign_busy'] * 100:.0f}% of one core",
        )
        t.add(
            name,
            "provider calls per unique ID",
            _n(s4["calls_per_id"], 3),
            "1.000",
            _exact(round(s4["calls_per_id"], 6), 1.0),
        )
        t.add(name, "lost requests", _n(s4["lost"]), "0", _exact(s4["lost"], 0))
    s5 = results.get("s5")
    if s5 is not None:
        from llmstream.devtools.traffic_bench import bench_rows

        for figure, measured, target, met in bench_rows(s5.values):
            t.add("5 traffic control", figure, measured, target, "met" if met else "**missed**")
    return t


def render_report(
    results: dict[str, Figures], options: BenchOptions, rig_info: dict[str, Any]
) -> str:
    m = rig_info["machine"]
    header = (
        f"llmstream bench: {options.requests:,} requests per scenario, simulator "
        f"{options.latency_ms:.0f} ms ± {options.latency_jitter * 100:.0f}%, "
        f"{options.in_flight} in flight, {options.partitions} partitions\n"
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"{m['os']}, {m['python']}\n"
        f"placement: {rig_info['placement']}\n"
        f"broker: {rig_info['broker']}\n"
    )
    return header + "\n" + build_table(results, options).render()


# --- the run ---------------------------------------------------------------------------------


async def _run_scenarios(rig: Rig) -> dict[str, Figures]:
    options = rig.options
    results: dict[str, Figures] = {}
    if 1 in options.scenarios:
        _say("scenario 1: backlog drain, one worker")
        results["s1"] = await drain_backlog(rig, "s1", 1)
        _say(f"scenario 1: {results['s1']['rps']:,.0f} requests/s")
    if 2 in options.scenarios:
        _say("scenario 2: the bare loop")
        results["s2"] = await bare_loop(rig)
        _say(f"scenario 2: {results['s2']['rps']:,.0f} requests/s")
    if 3 in options.scenarios:
        base = (
            results["s1"]["rps"]
            if "s1" in results
            else options.in_flight / (options.latency_ms / 1000) / 2
        )
        rate = max(1.0, base / 2)
        _say(
            f"scenario 3: steady load at {rate:,.0f} requests/s for {options.steady_seconds:.0f} s"
        )
        results["s3"] = await steady_load(rig, rate)
    if 4 in options.scenarios:
        _say("scenario 4: two workers drain the backlog")
        results["s4"] = await drain_backlog(rig, "s4", 2)
        _say(f"scenario 4: {results['s4']['rps']:,.0f} requests/s")
    if 5 in options.scenarios:
        from llmstream.devtools.traffic_bench import Rig as TrafficRig
        from llmstream.devtools.traffic_bench import bench_figures

        _say("scenario 5: traffic control at a rate limit (time x10)")
        traffic_rig = TrafficRig(
            rig.bootstrap, rig.redis_url, rig.workdir, idempotent_producer=not rig.embedded_broker
        )
        results["s5"] = Figures(await bench_figures(traffic_rig))
        for line in results["s5"]["lines"]:
            _say(f"scenario 5: {line}")
    return results


def run_bench(options: BenchOptions) -> int:
    """Run the scenarios, print the table, write --json; returns the exit code."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    placement = Placement.detect()
    if placement.others is not None:
        # The driver itself stays off the measured CPU.
        os.sched_setaffinity(0, placement.others)
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"llmstream-bench-{run_id}-"))
    started = time.monotonic()
    with EmbeddedServices.from_env() as services:
        assert services.kafka_bootstrap_servers and services.redis_url
        service_pids = [p.process.pid for p in services._processes if p.process]
        for pid in service_pids:
            pin_process(pid, placement.others)
        sim_port = free_port()
        simulator = Child(
            "simulator",
            [
                sys.executable,
                "-m",
                "llmstream.cli",
                "simulate",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--latency-ms",
                str(options.latency_ms),
            ],
            {
                **os.environ,
                "LLMSTREAM_SIM_LATENCY_JITTER": str(options.latency_jitter),
                "LLMSTREAM_SIM_SEED": "5",
            },
            workdir / "simulator",
            placement.others,
        ).start()
        try:
            rig = Rig(
                options,
                placement,
                services.kafka_bootstrap_servers,
                services.redis_url,
                f"http://127.0.0.1:{sim_port}",
                workdir,
                run_id,
                [*service_pids, simulator.pid],
                embedded_broker="kafka (tansu)" in services.started,
            )
            asyncio.run(
                _wait_http(f"{rig.simulator_url}/_sim/stats", 30, simulator, lambda s: s == 200)
            )
            _say(f"services up (logs in {workdir}); {placement.describe()}")
            results = asyncio.run(_run_scenarios(rig))
        finally:
            simulator.stop()
        broker = (
            "Tansu (embedded)"
            if "kafka (tansu)" in services.started
            else f"{services.kafka_bootstrap_servers} (from KAFKA_BOOTSTRAP_SERVERS)"
        )
    info = {"machine": machine(), "placement": placement.describe(), "broker": broker}
    report = render_report(results, options, info)
    print(report, flush=True)
    _say(f"done in {time.monotonic() - started:.0f} s")
    if options.json_path is not None:
        document = {
            "options": {
                **{k: v for k, v in options.__dict__.items() if k != "json_path"},
                "scenarios": list(options.scenarios),
            },
            **info,
            "results": {k: v.values for k, v in results.items()},
            "table": report,
        }
        options.json_path.write_bytes(
            orjson.dumps(
                document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str
            )
        )
        _say(f"figures written to {options.json_path}")
    return 0


def _bare_loop_command(argv: Sequence[str]) -> int:
    url, n, in_flight, prefix, out = argv
    result = asyncio.run(_bare_loop_main(url, int(n), int(in_flight), prefix))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bare-loop":
        sys.exit(_bare_loop_command(sys.argv[2:]))
    sys.exit("usage: llmstream bench (this module's own entry point is the bare loop's child)")
