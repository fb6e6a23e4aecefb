"""The worker process: a faust agent on ``llm-requests`` with many requests in flight.

The agent only admits events: each one gets a ticket in :class:`~processors.acks.OrderedAcks` (in
offset order) and its own task running :class:`~processors.pipeline.RequestProcessor`. A slow call
or a retry's wait blocks nothing but its own task. The stream is ``noack()``: an event is acked
when its task has put its outcomes on the broker, through the ordered gate, so the committed
offset never passes an unfinished request, and an exception can never ack an event by escaping
the agent (faust acks in the stream's ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any

import faust
from aiohttp import web
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.transport.drivers.aiokafka import Producer as AIOKafkaDriverProducer
from faust.types import TP, Message, ProducerT
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from llmstream.core.connections import faust_options, idempotence_wanted, redis_client
from llmstream.core.sessions import SessionStore
from llmstream.core.tools import ToolExecutor, ToolRegistry
from llmstream.processors.acks import OrderedAcks, Ticket
from llmstream.processors.batches import BatchTier, batch_apis
from llmstream.processors.dedup import ClaimUnavailable, DedupStore
from llmstream.processors.lag import ConsumerLag
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.pipeline import Output, RequestProcessor, Source
from llmstream.processors.providers import create_http_client
from llmstream.processors.providers.settings import ProviderSettings, build_router
from llmstream.processors.redis_state import RedisGuard
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.traffic import TrafficControl

log = logging.getLogger(__name__)


class FaustEmitter:
    """Sends outputs with the faust app's producer and waits for the broker's acks."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def emit(self, outputs: Sequence[Output]) -> None:
        pending = [await self.send(o) for o in outputs]
        for acked in pending:  # all are in flight already: in turn costs less than a gather
            await acked

    async def send(self, output: Output) -> Awaitable[object]:
        """Hand ``output`` to the producer; the result resolves once the broker acked it."""
        try:
            return await self._app.producer.send(
                output.topic, output.key, output.value, None, None, None
            )
        except ProducerSendError as exc:
            # faust wraps aiokafka's errors; the pipeline tells transient ones (retried until
            # the broker is back) from permanent ones (a message too large) by aiokafka's type.
            if isinstance(exc.__cause__, KafkaError):
                raise exc.__cause__ from None
            raise


def create_faust_app(settings: WorkerSettings) -> faust.App:
    """The faust app of a worker: brokers and their security, consumer group, commit and
    membership settings, the producer's acks, idempotence and compression."""
    app = _App(
        settings.consumer_group,
        **faust_options(settings),
        autodiscover=False,
        web_enabled=False,  # our own endpoints (/metrics, /health, /ready) are served below
        topic_allow_declare=False,  # topics are created by deployment, not by workers
        # A rebalance must not wait for calls that last seconds: unfinished events of a revoked
        # partition are re-read by the new owner, and dedup stops a second provider call.
        stream_wait_empty=False,
        consumer_auto_offset_reset=settings.auto_offset_reset,
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        consumer_group_instance_id=settings.group_instance_id,
        broker_commit_interval=settings.commit_interval_s,
        # Enough buffered events per partition to keep max_in_flight busy.
        stream_buffer_maxsize=max(4096, settings.max_in_flight),
        # An output larger than this is refused by the producer and reported on llm-errors as
        # output_too_large; keep it at or under the topics' max.message.bytes.
        producer_max_request_size=settings.max_event_bytes,
        # faust keeps table state here; llmstream has no tables, but faust makes the folder
        # anyway: not in the working directory (read-only in containers).
        datadir=settings.faust_datadir,
        key_serializer="raw",
        value_serializer="raw",
    )
    app.idempotent_producer = idempotence_wanted(settings)
    return app


class _IdempotentProducer(AIOKafkaDriverProducer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "enable_idempotence": True}


class _App(faust.App):
    """faust's app with the idempotent producer when configured: faust 0.15 has no setting for
    it (it turns it on only inside transactions, which llmstream does not use)."""

    idempotent_producer = False

    def _new_producer(self) -> ProducerT:
        if not self.idempotent_producer:
            return super()._new_producer()
        return _IdempotentProducer(self.transport, loop=self.loop, beacon=self.beacon)


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
        self.app = create_faust_app(settings)
        self.acks: OrderedAcks[TP] = OrderedAcks(
            self._ack,
            max_held=settings.max_pending_acks_per_partition,
            pause=self._pause,
            resume=self._resume,
        )
        self._shutdown_grace_s = (
            settings.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = f"{settings.worker_id}-{uuid.uuid4().hex[:8]}"
        self._assigned = False
        self._stopping = False
        self._dedup: DedupStore | None = None
        self._traffic: TrafficControl | None = None
        # Why claims are paused (Redis unreachable or without its state), None while they go on.
        self._redis_problem: str | None = "not yet checked"
        topic = self.app.topic(
            settings.requests_topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.app.agent(topic, name="llmstream.process")(self._consume)
        self.app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

    def run(self) -> None:
        """Run until a signal stops the process."""
        _DrainingFaustWorker(self, self.app, loglevel="info", quiet=True).execute_from_commandline()

    async def drain(self) -> None:
        """Stop admitting events and starting provider attempts, let requests in flight finish
        (see :meth:`_drain`), hand the rest over, commit what is done.

        Runs before faust stops its consumer and producer: faust's own shutdown does not wait
        for tasks of ours, and closes the loop under them.
        """
        self._stopping = True
        if self._dedup is not None:
            self._dedup.draining = True  # no new provider attempt: the next owner makes it
        await self._drain()
        if self._dedup is not None:
            # Every task of ours has finished, so nothing of ours is still calling: let other
            # workers take the unfinished claims over at once rather than one lease later.
            with contextlib.suppress(ClaimUnavailable):
                await self._dedup.resign()
        with contextlib.suppress(Exception):
            await self.app.consumer.commit()

    # -- the agent ------------------------------------------------------------------------------

    async def _consume(self, stream: faust.StreamT[bytes]) -> None:
        async with self._runtime() as processor:
            slots = asyncio.Semaphore(self.settings.max_in_flight)
            if self._traffic is not None:
                # Requests waiting for a provider's budget give their slot back meanwhile.
                self._traffic.room.bind(slots)
            # noack(): faust must not ack on its own; see the module docstring.
            async for event in stream.noack().events():  # type: ignore[attr-defined]
                await slots.acquire()
                if self._stopping:
                    # Shutting down: not admitted, not acked; the next owner reads it again.
                    slots.release()
                    continue
                message = event.message
                ticket = self.acks.admit(message.tp, message.offset)
                source = Source(message.topic, message.partition, message.offset)
                task = asyncio.create_task(self._run_one(processor, message, ticket, source, slots))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_one(
        self,
        processor: RequestProcessor,
        message: Message,
        ticket: Ticket[TP],
        source: Source,
        slots: asyncio.Semaphore,
    ) -> None:
        self.metrics.in_flight.inc()
        try:
            await processor.process(message.value, message.key, source)
        except asyncio.CancelledError:
            raise  # shutdown: not acked; the next owner re-reads it
        except Exception:
            # A bug of ours, not of the input (bad input is routed by the pipeline). Not acked,
            # so the event is re-read after a restart rather than lost; the partition waits.
            log.exception("unexpected failure on %s; the event stays unacked", source)
            raise
        else:
            self.metrics.committable.inc(self.acks.finish(ticket))
            self.metrics.held_acks.set(self.acks.held())
        finally:
            self.metrics.in_flight.dec()
            slots.release()

    def _ack(self, tp: TP, offset: int) -> None:
        # The gate keeps offsets, not faust's message (its payload would stay in memory as
        # long as the partition's head is unfinished): faust's consumer needs only where it is.
        self.app.consumer.ack(
            Message(tp.topic, tp.partition, offset, 0.0, 0, None, None, None, None, tp=tp)
        )

    def _pause(self, tp: TP) -> None:
        log.warning(
            "%s holds more than %d finished events behind an unfinished one: not read until it "
            "finishes (LLMSTREAM_MAX_PENDING_ACKS_PER_PARTITION)",
            tp,
            self.settings.max_pending_acks_per_partition,
        )
        self.app.consumer.pause_partitions({TP(tp.topic, tp.partition)})
        self.metrics.paused_partitions.set(len(self.acks.paused()))

    def _resume(self, tp: TP) -> None:
        log.info("%s read again: its held events were committed or handed over", tp)
        # faust's own TP: resume_partitions adds what it is given to its active set as is, and
        # the message's tp is the driver's (aiokafka's) type, which faust's fetcher rejects.
        self.app.consumer.resume_partitions({TP(tp.topic, tp.partition)})
        self.metrics.paused_partitions.set(len(self.acks.paused()))

    async def _on_revoked(self, sender: object, revoked: set[Any], **kwargs: object) -> None:
        dropped = self.acks.revoke(revoked)
        self.metrics.held_acks.set(self.acks.held())
        if dropped:
            log.info("partitions revoked; %d unfinished events left to their next owner", dropped)

    async def _on_assigned(self, sender: object, assigned: set[Any], **kwargs: object) -> None:
        self._assigned = True

    # -- resources ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _runtime(self) -> AsyncIterator[RequestProcessor]:
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
        router = build_router(self.providers, http)
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
            emitter=FaustEmitter(self.app),
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
            "kafka": "ok" if self._assigned else "not yet assigned partitions",
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


class _DrainingFaustWorker(faust.Worker):
    """faust's worker, draining llmstream's in-flight requests before faust shuts down."""

    def __init__(self, worker: Worker, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._llm_worker = worker
        self._drained = False

    async def stop(self) -> None:
        if not self._drained:
            self._drained = True
            await self._llm_worker.drain()
        await super().stop()
