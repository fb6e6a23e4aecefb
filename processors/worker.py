"""The worker process: a consumer of ``llm-requests`` with many requests in flight.

The fetch loop only admits events: each one gets a ticket in :class:`~processors.acks.OrderedAcks`
(in offset order) and its own task running :class:`~processors.pipeline.RequestProcessor`. A slow
call or a retry's wait blocks nothing but its own task. An event is released for commit when its
task has put its outcomes on the broker, through the ordered gate, so the committed offset never
passes an unfinished request; a task that fails releases nothing (see
:mod:`processors.kafka_io`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from llmstream.core.connections import redis_client
from llmstream.core.errors import LLMStreamError
from llmstream.core.sessions import SessionStore
from llmstream.core.tools import ToolExecutor, ToolRegistry
from llmstream.processors.acks import Ticket
from llmstream.processors.batches import BatchTier, batch_apis
from llmstream.processors.dedup import ClaimUnavailable, DedupStore
from llmstream.processors.kafka_io import KafkaEmitter, RequestReader, create_producer
from llmstream.processors.lag import ConsumerLag
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.pipeline import Emitter, RequestProcessor, Source
from llmstream.processors.providers import create_http_client
from llmstream.processors.providers.pool import ConnectionPool
from llmstream.processors.providers.settings import ProviderSettings, build_router
from llmstream.processors.redis_state import RedisGuard
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.traffic import TrafficControl

log = logging.getLogger(__name__)


class Worker:
    """One worker process. ``Worker(settings).run()`` blocks until SIGINT/SIGTERM."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        providers: ProviderSettings | None = None,
        registry: CollectorRegistry | None = None,
        shutdown_grace_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers or ProviderSettings()
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self._reader: RequestReader | None = None  # made on the loop it runs on (serve)
        self._shutdown_grace_s = (
            settings.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = f"{settings.worker_id}-{uuid.uuid4().hex[:8]}"
        self._stopping = False
        self._dedup: DedupStore | None = None
        self._traffic: TrafficControl | None = None
        # Why claims are paused (Redis unreachable or without its state), None while they go on.
        self._redis_problem: str | None = "not yet checked"

    def run(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
        """Run until SIGINT or SIGTERM, then drain (see :meth:`drain`) and stop."""
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(self.serve())

    async def serve(self) -> None:
        """Consume until SIGINT or SIGTERM (or until the consumer fails), then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        producer = create_producer(self.settings)
        reader = self._reader = RequestReader(self.settings, self.metrics)
        # Read when scraped, not kept up to date on every request.
        self.metrics.in_flight.set_function(lambda: len(self._tasks))
        self.metrics.held_acks.set_function(reader.acks.held)
        try:
            await producer.start()
            await reader.start()
        except KafkaError as exc:
            await producer.stop()
            await reader.stop()
            raise LLMStreamError(
                f"Kafka at {self.settings.kafka_bootstrap_servers} cannot be reached: {exc!r}"
            ) from None
        emitter = KafkaEmitter(producer, self.settings.max_event_bytes)
        try:
            async with self._runtime(emitter) as processor:
                _tune_gc()  # once everything of start-up exists
                consume = asyncio.create_task(self._consume(processor, reader))
                commits = asyncio.create_task(reader.commit_every(self.settings.commit_interval_s))
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({consume, stopped}, return_when=asyncio.FIRST_COMPLETED)
                failed = consume.done() and consume.exception() is not None
                log.info("stopping%s: draining requests in flight", " (fetch loop failed)" * failed)
                await self.drain()
                for task in (consume, commits, stopped):
                    task.cancel()
                await asyncio.gather(consume, commits, stopped, return_exceptions=True)
                if failed:
                    await consume  # raises the fetch loop's failure
        finally:
            await reader.stop()
            await emitter.close()
            await producer.stop()

    async def drain(self) -> None:
        """Stop admitting events and starting provider attempts, let requests in flight finish
        (see :meth:`_drain`), hand the rest over, commit what is done."""
        self._stopping = True
        if self._dedup is not None:
            self._dedup.draining = True  # no new provider attempt: the next owner makes it
        await self._drain()
        if self._dedup is not None:
            # Every task of ours has finished, so nothing of ours is still calling: let other
            # workers take the unfinished claims over at once rather than one lease later.
            with contextlib.suppress(ClaimUnavailable):
                await self._dedup.resign()
        try:
            if self._reader is not None:
                await self._reader.commit()
        except KafkaError as exc:
            log.warning(
                "last offset commit failed; the next owner re-reads from the last one: %r", exc
            )

    # -- the fetch loop ---------------------------------------------------------------------------

    async def _consume(self, processor: RequestProcessor, reader: RequestReader) -> None:
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        if self._traffic is not None:
            # Requests waiting for a provider's budget give their slot back meanwhile.
            self._traffic.room.bind(slots)
        loop = asyncio.get_running_loop()
        # Records beyond the free slots wait here, fetched, for a slot.
        fetch_size = min(self.settings.max_in_flight, 500)
        while not self._stopping:
            batches = await reader.fetch(fetch_size)
            for tp, records in batches.items():
                for record in records:
                    await slots.acquire()
                    ticket = None if self._stopping else reader.admit(tp, record.offset)
                    if ticket is None:
                        # Shutting down, or its partition was handed over meanwhile: not
                        # admitted, not committed; its owner reads it again.
                        slots.release()
                        break
                    source = Source(record.topic, record.partition, record.offset)
                    task = loop.create_task(
                        self._run_one(processor, record, ticket, source, reader, slots)
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _run_one(
        self,
        processor: RequestProcessor,
        record: ConsumerRecord[bytes, bytes],
        ticket: Ticket[TopicPartition],
        source: Source,
        reader: RequestReader,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            await processor.process(record.value, record.key, source)
        except asyncio.CancelledError:
            raise  # shutdown: not committed; the next owner re-reads it
        except Exception:
            # A bug of ours, not of the input (bad input is routed by the pipeline). Not
            # released, so the event is re-read after a restart rather than lost; the partition
            # waits.
            log.exception("unexpected failure on %s; the event stays uncommitted", source)
        else:
            self.metrics.committable.inc(reader.acks.finish(ticket))
        finally:
            slots.release()

    # -- resources ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _runtime(self, emitter: Emitter) -> AsyncIterator[RequestProcessor]:
        settings = self.settings
        tools = ToolRegistry.from_params(settings)  # a bad LLMSTREAM_TOOLS_FILE stops the start
        redis = redis_client(settings)
        http = create_http_client(
            timeout_s=self.providers.timeout_s, max_connections=settings.max_in_flight
        )
        dedup = DedupStore(
            redis,
            key_prefix=settings.redis_key_prefix,
            worker_token=self._token,
            lease_ms=settings.lease_ms,
            result_ttl_s=settings.result_ttl_s,
        )
        # Non-streamed provider calls take this pool's connections, streamed ones aiohttp's: each
        # is bounded by max_in_flight, as the calls are.
        pool = ConnectionPool(
            limit=settings.max_in_flight,
            connect_timeout_s=self.providers.timeout_s,
            read_timeout_s=self.providers.timeout_s,
        )
        router = build_router(self.providers, http, pool)
        log.info(
            "providers: %s; not configured: %s",
            ", ".join(router.names) or "none",
            ", ".join(f"{name} (set {hint})" for name, hint in router.unconfigured.items())
            or "none",
        )
        traffic = self._traffic = TrafficControl.from_settings(
            settings,
            redis=redis,
            router=router,
            metrics=self.metrics,
            worker_token=self._token,
        )
        # The batch tier: batches gathered here, and polled by whichever worker holds each.
        batches = BatchTier(
            settings,
            apis=batch_apis(self.providers, router, http),
            router=router,
            dedup=dedup,
            traffic=traffic,
            metrics=self.metrics,
        )
        processor = RequestProcessor(
            settings,
            dedup=dedup,
            router=router,
            emitter=emitter,
            metrics=self.metrics,
            traffic=traffic,
            # Tools are called with the providers' HTTP client (its connection limit included).
            tools=ToolExecutor(tools, http),
            sessions=SessionStore(redis, key_prefix=settings.redis_key_prefix, params=settings),
            batches=batches,
        )
        if len(tools):
            log.info("server-side tools: %s", ", ".join(tools.names))
        self._dedup = dedup
        heartbeat = asyncio.create_task(self._watch_redis(RedisGuard(redis, settings), dedup))
        background = [heartbeat, asyncio.create_task(traffic.run())]
        background.append(asyncio.create_task(batches.run()))
        if settings.consumer_lag_interval_s > 0:
            lag = ConsumerLag(settings, self.metrics.consumer_lag)
            background.append(asyncio.create_task(lag.run(settings.consumer_lag_interval_s)))
        runner = await self._serve_http()
        try:
            yield processor
        finally:
            await self._drain()
            await batches.close(self.providers.timeout_s)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await runner.cleanup()
            await http.close()
            await pool.close()
            await redis.aclose()

    async def _drain(self) -> bool:
        """Let in-flight requests finish; True when none had to be cancelled.

        Requests waiting (for a retry, rate budget, a circuit or their claim) get the grace
        (``LLMSTREAM_SHUTDOWN_GRACE_S``), then are cancelled. A provider call in flight is never
        cut short, nor an answer not yet stored: the next owner would pay for that call again.
        Those are bounded by the call's own timeout (``LLMSTREAM_PROVIDER_TIMEOUT_S``); only past
        grace plus that timeout (Redis unreachable while storing) is everything cancelled.
        Cancelled tasks are awaited, so nothing of theirs runs when the claims are resigned.
        """
        if not self._tasks:
            return True
        grace = self._shutdown_grace_s
        log.info("waiting up to %.0f s for %d requests in flight", grace, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        cancelled = bool(pending)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.providers.timeout_s
        calling = self._dedup.calling if self._dedup is not None else None
        while pending:
            for task in pending:
                holds_a_call = calling is not None and calling(task)
                if not task.cancelling() and (not holds_a_call or loop.time() >= give_up):
                    task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.2)
        return not cancelled

    async def _watch_redis(self, guard: RedisGuard, dedup: DedupStore) -> None:
        """Check Redis every ``LLMSTREAM_REDIS_CHECK_INTERVAL_S`` and renew the lease several
        times per lease. A failed check pauses claims at once (the lease counts as lapsed here,
        so no claim is made against a Redis that may have lost its records); claims resume only
        after a check finds the deployment epoch again and the lease is renewed."""
        loop = asyncio.get_running_loop()
        renew_every = dedup.lease_ms / 1000 / 4
        renew_at = 0.0
        while True:
            problem = await guard.check()
            if problem is None and (self._redis_problem is not None or loop.time() >= renew_at):
                try:
                    async with asyncio.timeout(self.settings.redis_check_timeout_s):
                        await dedup.heartbeat()
                except (ClaimUnavailable, TimeoutError) as exc:
                    problem = f"unreachable: claims are paused (fail closed): {exc}"
                else:
                    renew_at = loop.time() + renew_every
            if problem is not None:
                dedup.suspend()
                if self._redis_problem != problem:
                    log.warning("Redis %s", problem)
            elif self._redis_problem is not None and self._redis_problem != "not yet checked":
                log.info("Redis is back: claiming resumes")
            self._redis_problem = problem
            self.metrics.redis_up.set(0 if problem and problem.startswith("unreachable") else 1)
            await asyncio.sleep(self.settings.redis_check_interval_s)

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Readiness: Redis answered the last check (at most ``LLMSTREAM_REDIS_CHECK_INTERVAL_S``
        ago) and holds its state, the consumer joined its group, and no provider/model has kept
        failing here for longer than ``LLMSTREAM_MAX_QUEUE_S``."""
        checks = {
            "redis": self._redis_problem or "ok",
            "kafka": "ok"
            if self._reader is not None and self._reader.assigned
            else "not yet assigned partitions",
            "providers": self._providers_check(),
        }
        return all(v == "ok" for v in checks.values()), checks

    def _providers_check(self) -> str:
        down = self._traffic.outages.down(self.settings.max_queue_s) if self._traffic else {}
        if not down:
            return "ok"
        return "; ".join(f"{name} unavailable: {why}" for name, why in sorted(down.items()))

    async def _serve_http(self) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(_: web.Request) -> web.Response:
            return web.json_response({"status": "alive"})

        async def ready(_: web.Request) -> web.Response:
            ok, checks = self.ready()
            return web.json_response(
                {"status": "ready" if ok else "not ready", "checks": checks},
                status=200 if ok else 503,
            )

        http_app = web.Application()
        http_app.add_routes(
            [web.get("/metrics", metrics), web.get("/health", health), web.get("/ready", ready)]
        )
        runner = web.AppRunner(http_app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        return runner


# The cyclic garbage collector's first threshold: net allocations of container objects between
# two youngest-generation collections (CPython's default is 700).
_GC_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Collect cyclic garbage less often, and never walk what start-up made.

    Hundreds of requests in flight keep thousands of objects alive (coroutine frames, futures,
    events): with CPython's default threshold of 700 they set off about 140 collections a second,
    each walking them, which measured 18-20 % of the worker's CPU under ``llmstream bench``
    (``gc.callbacks`` timing each collection). Reference counting frees almost everything a
    request makes when it ends, so collecting rarely holds little garbage: peak RSS stayed the
    same. ``gc.freeze()`` moves the objects of start-up (modules, settings, clients) out of the
    collector's way for good.
    """
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 20)
