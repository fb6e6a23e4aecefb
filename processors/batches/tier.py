"""The batch tier as the pipeline and the poller see it: which requests go into a batch, what a
taker does with a request its dead owner was submitting, and the background tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import BatchState, Submission, SubmissionStore, WorkerOp
from llmstream.processors.batches.api import BatchAPI
from llmstream.processors.batches.collector import REDIS_ERRORS, Collector, Persist, guarded
from llmstream.processors.dedup import Claim, ClaimStatus, DedupStore
from llmstream.processors.metrics import BatchMetrics, WorkerMetrics
from llmstream.processors.outcomes import Outcomes, Source
from llmstream.processors.providers import ProviderError, ProviderRouter
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.tiers import choose_tier, flex_capable
from llmstream.processors.traffic import TrafficControl
from llmstream.schemas.models import LLMError, LLMMetric, LLMRequest, LLMResponse

__all__ = ["BatchTier", "Emit", "Serve"]

log = logging.getLogger(__name__)

# The pipeline's emit-and-mark: the outcome and its metric on the broker, then marked emitted.
Emit = Callable[[str, LLMResponse | LLMError, LLMMetric], Awaitable[None]]
# The pipeline's synchronous path for a request whose claim this worker holds.
Serve = Callable[[LLMRequest, Source], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Bound:
    """What the batch tier borrows from the pipeline, so an outcome is stored, emitted and
    counted one way whichever tier served it."""

    persist: Persist
    emit: Emit
    serve: Serve
    events: Outcomes


class BatchTier:
    """One worker's batch tier: the collector, the poller, and the rules between them."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        apis: Mapping[str, BatchAPI],
        router: ProviderRouter,
        dedup: DedupStore,
        traffic: TrafficControl,
        metrics: WorkerMetrics,
    ) -> None:
        from llmstream.processors.batches.poller import Poller  # the poller reads this tier

        self.settings = settings
        self.apis = dict(apis)
        self.router = router
        self.dedup = dedup
        self.traffic = traffic
        self.worker_metrics = metrics
        self.metrics = BatchMetrics(metrics.registry)
        self.store = SubmissionStore(dedup.records.redis, key_prefix=settings.redis_key_prefix)
        self._bound: Bound | None = None
        self._collector: Collector | None = None
        self.poller = Poller(self)

    def bind(self, persist: Persist, emit: Emit, serve: Serve, events: Outcomes) -> None:
        """Called by the pipeline that this tier serves."""
        self._bound = Bound(persist, emit, serve, events)
        self._collector = Collector(
            self.settings,
            dedup=self.dedup,
            store=self.store,
            metrics=self.metrics,
            persist=persist,
        )

    @property
    def bound(self) -> Bound:
        assert self._bound is not None, "the batch tier serves no pipeline yet"
        return self._bound

    # -- the pipeline's hook ------------------------------------------------------------------

    async def admit(self, request: LLMRequest, claim: Claim, source: Source) -> bool:
        """After the claim: True when a batch holds the request now (or another worker does),
        so the pipeline has nothing more to do; False when it goes on synchronously."""
        if claim.status is ClaimStatus.BATCHED:
            self.worker_metrics.dedup.labels("batched").inc()
            return True
        if claim.status is ClaimStatus.RESOLVE:
            assert claim.submission is not None
            if await self.resolve(request.request_id, claim.submission):
                return True
        elif claim.status is not ClaimStatus.CLAIMED:
            return False
        return await self.route(request, source, park=True)

    async def route(
        self, request: LLMRequest, source: Source, *, again: bool = False, park: bool = False
    ) -> bool:
        """A request this worker holds the claim of: into a batch when its tier is ``batch``
        (True once a batch holds it, or another worker took it over); False to call it now.

        ``again`` (a batch line that failed or expired): only while its deadline leaves room for
        another batch (``LLMSTREAM_BATCH_MIN_DEADLINE_S``). ``park``: the caller holds one of the
        worker's in-flight slots, given back while the batch gathers.
        """
        if (request.service_tier or self.settings.default_service_tier) in ("standard", "flex"):
            # Never a batch: the common case goes on without resolving and choosing twice
            # (traffic control resolves its tier itself).
            return False
        now = wall_clock_ms()
        deadline = request.deadline_ms
        if deadline is not None and deadline <= now:
            return False  # expired: said so by the synchronous path
        try:
            provider, model = self.router.resolve(request)
        except ProviderError:
            return False
        api = self.apis.get(provider.name)
        tier = choose_tier(
            request,
            now_ms=now,
            params=self.settings,
            batch_capable=api is not None and _batchable(request),
            flex_capable=flex_capable(provider),
        )
        if api is None or tier != "batch":
            return False
        room_ms = self.settings.batch_min_deadline_s * 1000
        if again and deadline is not None and deadline - now < room_ms:
            return False
        try:
            line = api.line(request, model, api.custom_id(request.request_id))
        except ProviderError:
            return False  # this API cannot express it: the synchronous call says why
        assert self._collector is not None
        stay = self.traffic.room.stay()
        if park:
            stay.park()
        try:
            await self._collector.add(request, source, api, model, line)
        except asyncio.CancelledError:
            stay.abandon()
            raise
        finally:
            await stay.resume()
        return True

    async def resolve(self, request_id: str, submission: str) -> bool:
        """A request claimed from a worker that died submitting it in ``submission``: True when
        that batch exists (the record now says ``batched``) or another worker has the request;
        False when it was never sent (or never will be), and this worker holds it ``claimed``."""
        persist, token = self.bound.persist, self.dedup.worker_token
        while True:
            found = await persist(
                lambda: guarded(self.store.get(submission), "read a batch submission"),
                "read a batch submission",
            )
            if found is not None and found.state == BatchState.CREATED:
                mark = WorkerOp("B", request_id, (submission, found.batch or "", "", ""))
                await self.run_ops([mark], "mark a request batched")
                return True
            if found is None or found.state == BatchState.ABANDONED:
                if found is None:
                    answer = await persist(
                        lambda: guarded(
                            self.store.abandon(submission, token, "", ""), "abandon a submission"
                        ),
                        "abandon a submission",
                    )
                    if answer.answer != "abandoned":
                        continue
                out = WorkerOp("x", request_id, (submission, wall_clock_ms(), "", ""))
                [(epoch, _)] = await self.run_ops([out], "take a request out of a batch")
                if epoch == "0":
                    return True  # moved on meanwhile: not this worker's
                self.dedup.hold(request_id, epoch)
                return False
            if not await self.settle_intent(found):
                await asyncio.sleep(0.5)  # its submitter lives and is sending it

    async def run_ops(self, ops: Sequence[WorkerOp], what: str) -> list[tuple[str, bytes | None]]:
        """Run operations on request records, until Redis takes them."""
        token, records = self.dedup.worker_token, self.dedup.records
        return await self.bound.persist(lambda: guarded(records.run(token, ops), what), what)

    def sending(self, submission: str) -> bool:
        """Whether this worker is sending ``submission`` now."""
        return self._collector is not None and submission in self._collector.sending

    async def settle_intent(self, submission: Submission) -> bool:
        """A submission still in ``intent``: when its submitter is dead (or is this worker, not
        sending it), adopt the batch it created (where the provider can say) or abandon it.
        False while its submitter sends it (or Redis or the provider cannot be reached: asked
        again later)."""
        owner, token = submission.owner or "", self.dedup.worker_token
        api = self.apis.get(submission.provider)
        try:
            if self.sending(submission.id):
                return False
            if owner != token and await self.dedup.records.alive(owner):
                return False
            batch = None
            if api is not None and api.can_find:
                batch = await api.find(submission.id, submission.created_at_ms)
            if batch is not None:
                answer = await self.store.adopt(
                    submission.id, token, owner, submission.epoch, batch, wall_clock_ms()
                )
            else:
                answer = await self.store.abandon(submission.id, token, owner, submission.epoch)
        except (ProviderError, *REDIS_ERRORS) as exc:
            log.warning("submission %s not settled yet: %s", submission.id, exc)
            return False
        if not answer.changed:
            return True  # another worker settled it first, and counted it
        result = "adopted" if batch is not None else "abandoned"
        log.warning(
            "submission %s of %d requests, whose submitter %s died: %s (%s)",
            submission.id,
            len(submission.requests),
            owner,
            result,
            answer.answer,
        )
        self.metrics.submissions.labels(submission.provider, result).inc()
        return True

    # -- background -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Gather and send batches, and poll those this worker holds; until cancelled."""
        assert self._collector is not None
        await asyncio.gather(self._collector.run(), self.poller.run())

    async def close(self, grace_s: float) -> None:
        """At shutdown: submissions under way get ``grace_s`` to finish, polling stops."""
        await self.poller.close()
        if self._collector is not None:
            await self._collector.close(grace_s)


def _batchable(request: LLMRequest) -> bool:
    """What a batch cannot serve: a stream, a session's turn (answered in order), and the
    server-side tool loop (several calls, each depending on the last)."""
    return not request.stream and request.session_id is None and not request.server_tools
