"""Traffic control end to end: goodput at a provider's rate limit, adaptation to a limit lower
than configured, and a provider outage behind a circuit breaker.

Each scenario runs real worker processes (``python -m llmstream.cli worker``) against a broker,
Redis and in-process provider simulators, on its own topics, consumer group and Redis key prefix.
``llmstream bench-traffic`` runs them at full size; the test suite runs the same code
time-scaled (``scale=10``: rates ten times higher, every window, pause and cool-down ten times
shorter), so the command a user runs is the code the suite checks.

1. **goodput**: the simulator accepts ``limit_rpm`` calls in any sliding minute; ``requests``
   are queued before two workers configured with that limit start. Goodput (successful calls per
   minute, first to last) should be within 5% of the limit, with under 1% of calls answered 429.
2. **adaptive**: the same, with the workers configured at twice the real limit: the adaptive
   factor must converge; under 5% of calls answered 429 after the first 30 s; nothing lost.
3. **circuit**: requests arrive steadily while the primary provider answers 503 for
   ``outage_s``. Its circuit opens; requests with a fallback are answered by the fallback, the
   others wait and are answered by the primary after recovery; no request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import EmbeddedServices, create_topics
from llmstream.devtools.processes import WorkerProcess, scoped_settings, topic_names, worker_env
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import ChatMessage, LLMError, LLMRequest, LLMResponse

__all__ = [
    "AdaptiveResult",
    "CallCounts",
    "CircuitResult",
    "Rig",
    "run_adaptive",
    "run_circuit",
    "run_goodput",
    "run_traffic_bench",
]

PRIMARY = "openai/gpt-4o-mini"
FALLBACK = "anthropic/claude-3-5-haiku"


@dataclass(frozen=True)
class Rig:
    """Where the scenarios run: the broker, Redis, and a directory for worker logs."""

    bootstrap: str
    redis_url: str
    workdir: Path
    # The embedded Tansu broker cannot grant producer IDs, so the idempotent producer is off
    # against it; Apache Kafka keeps it on.
    idempotent_producer: bool = False


@dataclass
class _Scenario:
    rig: Rig
    name: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def prefix(self) -> str:
        return f"tb-{self.run_id}-{self.name}"

    @property
    def settings(self) -> ServiceSettings:
        rig = self.rig
        return scoped_settings(
            rig.bootstrap, rig.redis_url, self.prefix, idempotent_producer=rig.idempotent_producer
        )

    def topic(self, kind: str) -> str:
        return f"{self.prefix}-llm-{kind}"

    async def create_topics(self) -> None:
        await create_topics(self.rig.bootstrap, topic_names(self.settings), partitions=4)

    def worker_env(self, openai_url: str, anthropic_url: str, **extra: str) -> dict[str, str]:
        group = f"{self.prefix}-group"
        return worker_env(
            self.settings, openai_url, group, anthropic_url=anthropic_url, extra=extra
        )

    @contextlib.asynccontextmanager
    async def workers(self, env: dict[str, str], count: int) -> AsyncIterator[list[int]]:
        """``count`` worker processes, ready (joined their group); yields their HTTP ports."""
        names = [f"{self.name}-worker-{i}" for i in range(count)]
        workers = [WorkerProcess(env, self.rig.workdir, name) for name in names]
        try:
            await asyncio.gather(*(asyncio.to_thread(w.start) for w in workers))
            await asyncio.gather(*(w.wait_ready() for w in workers))
            yield [w.port for w in workers]
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))

    async def produce(self, requests: Sequence[LLMRequest]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.rig.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            pending = [
                await producer.send(self.topic("requests"), encode(r), key=r.request_id.encode())
                for r in requests
            ]
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    async def outcomes(
        self, ids: set[str], within_s: float
    ) -> tuple[dict[str, LLMResponse], dict[str, LLMError], int]:
        """Responses and errors by request ID once every ID has one (or at the timeout), and
        how many outcomes were emitted more than once."""
        responses: dict[str, LLMResponse] = {}
        errors: dict[str, LLMError] = {}
        seen: Counter[str] = Counter()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.rig.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            tps = [
                TopicPartition(topic, p)
                for topic in (self.topic("responses"), self.topic("errors"))
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + within_s
            while len(ids - responses.keys() - errors.keys()) and time.monotonic() < deadline:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for record in records:
                        if tp.topic == self.topic("responses"):
                            response = decode(record.value, LLMResponse)
                            responses[response.request_id] = response
                            seen[response.request_id] += 1
                        else:
                            error = decode(record.value, LLMError)
                            if error.request_id is not None:
                                errors[error.request_id] = error
                                seen[error.request_id] += 1
        finally:
            await consumer.stop()
        return responses, errors, sum(n - 1 for n in seen.values())


async def scrape(ports: Sequence[int], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The sum over workers of every sample of metric ``name``, by label set."""
    total: dict[tuple[tuple[str, str], ...], float] = {}
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name:
                        labels = tuple(sorted(sample.labels.items()))
                        total[labels] = total.get(labels, 0.0) + sample.value
    return total


def _request(request_id: str, model: str = PRIMARY, **kw: Any) -> LLMRequest:
    return LLMRequest(
        request_id=request_id,
        model=model,
        messages=[ChatMessage(role="user", content=f"Tell me one fact about {request_id}.")],
        created_at_ms=wall_clock_ms(),
        **kw,
    )


async def _sim_get(sim: SimulatorServer, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(f"{sim.url}{path}") as response:
        return await response.json()


async def _sim_config(sim: SimulatorServer, **config: Any) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sim.url}/_sim/config", json=config) as response,
    ):
        response.raise_for_status()


# --- 1 and 2: goodput at the limit, adaptation to a lower one --------------------------------


@dataclass(kw_only=True)
class _Outcomes:
    """What became of a scenario's requests, and how long it took."""

    requests: int
    completed: int = 0
    errors: int = 0
    lost: int = 0
    seconds: float = 0.0

    def count(self, ids: set[str], responses: dict[str, Any], errors: dict[str, Any]) -> None:
        self.completed = len(responses)
        self.errors = len(errors)
        self.lost = len(ids - responses.keys() - errors.keys())


@dataclass(frozen=True)
class CallCounts:
    """Calls the simulator answered, and how many of them it answered 429."""

    total: int = 0
    answered_429: int = 0

    @classmethod
    def of(cls, stats: dict[str, Any]) -> CallCounts:
        """The counts in the simulator's ``/_sim/stats``."""
        return cls(stats["calls_total"], stats["status_counts"].get("429", 0))

    def __sub__(self, earlier: CallCounts) -> CallCounts:
        return CallCounts(self.total - earlier.total, self.answered_429 - earlier.answered_429)

    @property
    def share_429(self) -> float:
        return self.answered_429 / self.total if self.total else 0.0


@dataclass(kw_only=True)
class AdaptiveResult(_Outcomes):
    """Figures of the goodput and adaptive scenarios (rates per minute of real time)."""

    scenario: str
    limit_rpm: float
    configured_rpm: float
    duplicate_outputs: int = 0
    calls: CallCounts = field(default_factory=CallCounts)
    # The same, from the first call plus 30 s (scaled) on: after the limiter has adapted.
    calls_after_warmup: CallCounts = field(default_factory=CallCounts)
    goodput_rpm: float = 0.0
    final_factor: float | None = None
    factor_trace: list[tuple[float, float]] = field(default_factory=list)

    @property
    def share_429(self) -> float:
        return self.calls.share_429

    @property
    def share_429_after_warmup(self) -> float:
        return self.calls_after_warmup.share_429

    @property
    def goodput_ratio(self) -> float:
        return self.goodput_rpm / self.limit_rpm

    def line(self, scale: float) -> str:
        per = "/min" if scale == 1 else f"/min (time x{scale:g})"
        return (
            f"{self.scenario}: limit {self.limit_rpm:,.0f}{per}, workers configured at "
            f"{self.configured_rpm:,.0f}; goodput {self.goodput_rpm:,.0f}/min = "
            f"{self.goodput_ratio * 100:.1f}% of the limit; {self.calls.total:,} calls, "
            f"{self.calls.answered_429:,} answered 429 ({self.share_429 * 100:.2f}%), after the "
            f"first {30 / scale:g} s {self.calls_after_warmup.answered_429:,} of "
            f"{self.calls_after_warmup.total:,} "
            f"({self.share_429_after_warmup * 100:.2f}%); completed {self.completed:,} of "
            f"{self.requests:,}, lost {self.lost}, errors {self.errors}, duplicate outputs "
            f"{self.duplicate_outputs}; final rate factor "
            f"{self.final_factor if self.final_factor is not None else 'n/a'}; "
            f"{self.seconds:.1f} s"
        )


def scaled_env(scale: float) -> dict[str, str]:
    """Every time constant of traffic control divided by ``scale``."""
    return {
        "LLMSTREAM_ADAPTIVE_WINDOW_S": repr(60.0 / scale),
        "LLMSTREAM_ADAPTIVE_RECOVERY_PER_MIN": repr(0.1 * scale),
        "LLMSTREAM_RATE_LIMIT_HORIZON_S": repr(0.5 / scale),
        "LLMSTREAM_TRAFFIC_SYNC_S": repr(0.5 / scale),
        "LLMSTREAM_CIRCUIT_WINDOW_S": repr(10.0 / scale),
        "LLMSTREAM_CIRCUIT_COOLDOWN_S": repr(10.0 / scale),
    }


# Scenarios 1 and 2 differ only in the rate the workers are configured with: this many times
# the provider's real limit.
_CONFIGURED_TIMES_LIMIT = {"goodput": 1.0, "adaptive": 2.0}


async def _limited_run(
    rig: Rig,
    scenario: str,
    *,
    limit_rpm: float,
    requests: int,
    scale: float,
    workers: int = 2,
    latency_ms: float = 200.0,
) -> AdaptiveResult:
    run = _Scenario(rig, scenario)
    limit_rpm *= scale  # the simulator, like every time constant, runs `scale` times faster
    configured_rpm = _CONFIGURED_TIMES_LIMIT[scenario] * limit_rpm
    result = AdaptiveResult(
        scenario=scenario, limit_rpm=limit_rpm, configured_rpm=configured_rpm, requests=requests
    )
    settings = SimulatorSettings(
        host="127.0.0.1",
        port=0,
        latency_ms=latency_ms,
        rpm_limit=round(limit_rpm),
        rate_window_s=60.0 / scale,
    )
    async with SimulatorServer(settings) as sim:
        await run.create_topics()
        batch = [_request(f"{run.prefix}-{i}") for i in range(requests)]
        ids = {r.request_id for r in batch}
        await run.produce(batch)  # queued before any worker starts
        env = run.worker_env(
            sim.url,
            sim.url,
            LLMSTREAM_RATE_LIMITS=json.dumps({"openai": {"rpm": configured_rpm}}),
            **scaled_env(scale),
        )
        snapshots: list[tuple[float, CallCounts]] = []
        async with run.workers(env, workers) as ports:
            started = time.monotonic()
            collect = asyncio.create_task(
                run.outcomes(ids, within_s=requests / limit_rpm * 60 * 3 + 120)
            )
            while not collect.done():
                snapshots.append(
                    (time.monotonic(), CallCounts.of(await _sim_get(sim, "/_sim/stats")))
                )
                factors = await scrape(ports[:1], "llmstream_adaptive_rate_factor")
                if factors:
                    result.factor_trace.append(
                        (round(time.monotonic() - started, 2), round(min(factors.values()), 3))
                    )
                await asyncio.wait({collect}, timeout=0.25)
            responses, errors, duplicates = await collect
            result.seconds = time.monotonic() - started
            # The factor is shared: one worker's view of it is everyone's.
            factors = await scrape(ports[:1], "llmstream_adaptive_rate_factor")
            if factors:
                result.final_factor = round(max(factors.values()), 3)
        stats = await _sim_get(sim, "/_sim/stats")
    result.count(ids, responses, errors)
    result.duplicate_outputs = duplicates
    result.calls = CallCounts.of(stats)
    first_call = next((t for t, counts in snapshots if counts.total > 0), started)
    warm = first_call + 30.0 / scale
    before = [counts for t, counts in snapshots if t <= warm]
    # The counts only grow: the last snapshot before the warm-up ends holds the most.
    result.calls_after_warmup = result.calls - (before[-1] if before else CallCounts())
    done = sorted(r.completed_at_ms for r in responses.values() if r.completed_at_ms)
    if len(done) > 1:
        result.goodput_rpm = (len(done) - 1) / ((done[-1] - done[0]) / 60_000)
    return result


async def run_goodput(
    rig: Rig, *, limit_rpm: float = 600, requests: int = 3000, scale: float = 1.0
) -> AdaptiveResult:
    """Scenario 1: two workers configured with the provider's real limit."""
    return await _limited_run(rig, "goodput", limit_rpm=limit_rpm, requests=requests, scale=scale)


async def run_adaptive(
    rig: Rig, *, limit_rpm: float = 600, requests: int = 3000, scale: float = 1.0
) -> AdaptiveResult:
    """Scenario 2: two workers configured with twice the provider's real limit."""
    return await _limited_run(rig, "adaptive", limit_rpm=limit_rpm, requests=requests, scale=scale)


# --- 3: an outage behind a circuit breaker ---------------------------------------------------


@dataclass(kw_only=True)
class CircuitResult(_Outcomes):
    """Figures of the circuit scenario; "during the outage" is defined in :func:`run_circuit`."""

    with_fallbacks: int
    outage_s: float
    during_outage_with_fallbacks: int = 0
    answered_by_fallback: int = 0
    during_outage_without_fallbacks: int = 0
    answered_by_primary_after_recovery: int = 0
    primary_503s: int = 0
    circuit_opened: float = 0.0
    circuit_closed: float = 0.0
    error_types: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"circuit: primary answered 503 for {self.outage_s:g} s; {self.requests:,} requests "
            f"({self.with_fallbacks:,} with a fallback); circuit opened "
            f"{self.circuit_opened:g}x, closed {self.circuit_closed:g}x; "
            f"{self.answered_by_fallback:,} of {self.during_outage_with_fallbacks:,} sent during "
            f"the outage with a fallback answered by it; "
            f"{self.answered_by_primary_after_recovery:,} of "
            f"{self.during_outage_without_fallbacks:,} without one answered by the primary after "
            f"recovery; {self.primary_503s:,} calls answered 503; completed {self.completed:,}, "
            f"errors {self.errors} {self.error_types or ''}, lost {self.lost}; "
            f"{self.seconds:.1f} s"
        )


async def run_circuit(
    rig: Rig,
    *,
    outage_s: float = 30.0,
    rate_per_s: float = 20.0,
    before_s: float = 5.0,
    after_s: float = 10.0,
    scale: float = 1.0,
) -> CircuitResult:
    """Scenario 3: the primary provider answers 503 for ``outage_s`` (divided by ``scale``)."""
    run = _Scenario(rig, "circuit")
    outage, before, after = outage_s / scale, before_s / scale, after_s / scale
    total = round(rate_per_s * (before + outage + after))
    result = CircuitResult(requests=total, with_fallbacks=0, outage_s=outage)
    sims = [
        SimulatorServer(SimulatorSettings(host="127.0.0.1", port=0, latency_ms=100)) for _ in "ab"
    ]
    async with sims[0] as primary, sims[1] as fallback:
        await run.create_topics()
        env = run.worker_env(primary.url, fallback.url, **scaled_env(scale))
        sent: dict[str, tuple[float, bool]] = {}  # id -> (time produced, has a fallback)
        async with run.workers(env, 2) as ports:
            started = time.monotonic()
            outage_from, outage_to = started + before, started + before + outage
            producer = AIOKafkaProducer(bootstrap_servers=rig.bootstrap, acks="all", linger_ms=5)
            await producer.start()
            failing = False
            try:
                for i in range(total):
                    due = started + i / rate_per_s
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    now = time.monotonic()
                    if not failing and outage_from <= now < outage_to:
                        await _sim_config(primary, error_rate=1.0, error_status=503)
                        failing = True
                    elif failing and now >= outage_to:
                        await _sim_config(primary, error_rate=0.0)
                        failing = False
                    with_fallback = i % 2 == 0
                    r = _request(f"{run.prefix}-{i}", fallbacks=[FALLBACK] if with_fallback else [])
                    sent[r.request_id] = (time.monotonic(), with_fallback)
                    await producer.send(run.topic("requests"), encode(r), key=r.request_id.encode())
                if failing:
                    await asyncio.sleep(max(0.0, outage_to - time.monotonic()))
                    await _sim_config(primary, error_rate=0.0)
                await producer.flush()
            finally:
                await producer.stop()
            recovered_ms = wall_clock_ms() - (time.monotonic() - outage_to) * 1000
            responses, errors, _ = await run.outcomes(set(sent), within_s=120 + outage)
            result.seconds = time.monotonic() - started
            transitions = await scrape(ports, "llmstream_circuit_transitions_total")
        stats = await _sim_get(primary, "/_sim/stats")
    for labels, value in transitions.items():
        transition = dict(labels).get("transition")
        if transition == "opened":
            result.circuit_opened += value
        elif transition == "closed":
            result.circuit_closed += value
    result.with_fallbacks = sum(1 for _, fb in sent.values() if fb)
    result.count(set(sent), responses, errors)
    result.error_types = dict(Counter(e.error_type for e in errors.values()))
    result.primary_503s = stats["status_counts"].get("503", 0)
    # "During the outage": produced once the circuit had a second to open, and picked up before
    # recovery (a request picked up after it is rightly answered by the recovered primary).
    for request_id, (at, with_fallback) in sent.items():
        if not outage_from + 1.0 <= at < outage_to - 1.0:
            continue
        response = responses.get(request_id)
        if with_fallback:
            result.during_outage_with_fallbacks += 1
            if response is not None and response.provider == "anthropic":
                result.answered_by_fallback += 1
        else:
            result.during_outage_without_fallbacks += 1
            if (
                response is not None
                and response.provider == "openai"
                and (response.completed_at_ms or 0) >= recovered_ms
            ):
                result.answered_by_primary_after_recovery += 1
    return result


# --- the command -----------------------------------------------------------------------------


SCENARIOS = ("goodput", "adaptive", "circuit")


async def _run_all(rig: Rig, scenarios: Sequence[str], scale: float, requests: int) -> list[str]:
    lines: list[str] = []
    if "goodput" in scenarios:
        _say("goodput: two workers configured at the provider's limit")
        goodput = await run_goodput(rig, requests=requests, scale=scale)
        lines.append(goodput.line(scale))
        _say(lines[-1])
    if "adaptive" in scenarios:
        _say("adaptive: two workers configured at twice the provider's limit")
        adaptive = await run_adaptive(rig, requests=requests, scale=scale)
        lines.append(adaptive.line(scale))
        _say(lines[-1])
        _say(f"adaptive: rate factor over time (s, factor): {adaptive.factor_trace[::8]}")
    if "circuit" in scenarios:
        _say("circuit: the primary provider answers 503 for 30 s")
        circuit = await run_circuit(rig, scale=scale)
        lines.append(circuit.line())
        _say(lines[-1])
    return lines


def _say(message: str) -> None:
    print(f"[bench-traffic] {message}", file=sys.stderr, flush=True)


def run_traffic_bench(
    scenarios: Sequence[str] = SCENARIOS, *, scale: float = 1.0, requests: int = 3000
) -> int:
    """Run the scenarios on embedded services (or ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``),
    print one line of figures each; returns the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="llmstream-bench-traffic-"))
    with EmbeddedServices.from_env() as services:
        assert services.kafka_bootstrap_servers and services.redis_url
        rig = Rig(
            services.kafka_bootstrap_servers,
            services.redis_url,
            workdir,
            idempotent_producer=not services.embedded_broker,
        )
        _say(f"services up; worker logs in {workdir}")
        lines = asyncio.run(_run_all(rig, scenarios, scale, requests))
    print("\n".join(lines), flush=True)
    return 0
