"""Batch submissions: which requests a worker sent (or is sending) to a provider's batch API, and
who polls that batch. The request records' batch states are in :mod:`.scripts` (``WORKER``).

A request goes into a batch in five steps, each a write that survives the worker::

    1. records    claimed (owner + epoch) -> submitting, submission = S, the request kept
    2. submission (none) -> intent: owner, provider, model, the requests   (+ S in the set)
    3. provider   the batch is created (OpenAI: the JSONL file, then the batch, S in its metadata)
    4. submission intent (owner + epoch) -> created, batch = B
    5. records    submitting(S) -> batched, batch = B: the event's offset may be committed

From step 5 the record is the source of truth, and whoever holds the submission's lease (at
first its submitter, then any worker that sees it dead) polls B and stores each line's outcome
into its record, fenced by the submission (``submitting`` or ``batched`` in S): one store wins.

A request seen in ``submitting`` whose owner died is taken over (its event was never
committed, so it comes again) and its submission is *resolved* before anything else:

- no submission recorded: step 2 never ran, so nothing was sent, and ``abandon`` records it as
  abandoned so that a submitter that was only stalled cannot send it afterwards (step 2 refuses);
- ``created``: the batch exists; the record is marked ``batched`` (step 5) by the taker;
- ``intent`` with its owner dead: the submitter died in step 3 or before step 4. Where the
  provider can be asked (OpenAI lists batches with their metadata) the batch is looked up by S
  and adopted when found; otherwise S is abandoned and its requests are taken back and
  batched again. **The window**: a submitter that dies after the provider accepted the batch
  and before step 4 (one HTTP answer and one Redis write), on a provider that cannot be asked,
  leaves a batch nobody reads: its requests are in two batches (paid twice) but answered once;
- ``abandoned``: the requests are taken back (``out of batch``) and go on as any claimed request.

The pollers do the same for every submission they find in ``intent`` with its submitter dead,
and for one of their own that no task of theirs is sending (Redis lost the write of step 4, or
the sending task failed): an abandoned submission stays among the unfinished until each request
still in it is taken back and sent on, since the events of requests that a lost write left in
``submitting`` may have been committed already.

A submitter that finds its submission abandoned at step 4 cancels the batch it just created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson

from llmstream.core.record import scripts
from llmstream.core.record.keys import AnyRedis, BatchField, Field, RecordKeys

__all__ = ["LineRecord", "Submission", "SubmissionAnswer", "SubmissionStore"]

# A submission outlives the provider's 24 h window by days; the poller deletes it when done.
SUBMISSION_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Submission:
    """A batch submission as stored."""

    id: str
    state: str  # a BatchState
    owner: str | None
    epoch: str
    provider: str
    model: str
    batch: str | None
    requests: list[tuple[str, str]]  # (request ID, custom_id), in the batch's order
    created_at_ms: int
    submitted_at_ms: int | None


@dataclass(frozen=True, slots=True)
class SubmissionAnswer:
    """What an operation on a submission answered: the state (or ``leased``, ``busy`` ...), the
    submission's epoch, the provider's batch ID when known, and whether this operation wrote it
    (False: found so, as when another worker settled the submission first)."""

    answer: str
    epoch: str
    batch: str | None
    changed: bool


@dataclass(frozen=True, slots=True)
class LineRecord:
    """What a batch's poller reads of a request's record."""

    request_id: str
    state: str | None  # None: no record
    submission: str | None
    owner: str | None
    emitted: bool
    calls: int
    request: bytes | None  # LLMRequest JSON, while batched
    source: str | None


_LINE_FIELDS = (
    Field.STATE,
    Field.SUBMISSION,
    Field.OWNER,
    Field.EMITTED,
    Field.CALLS,
    Field.REQUEST,
    Field.SOURCE,
)

Operation = Literal["intent", "created", "abandon", "adopt", "lease", "finish"]


class SubmissionStore:
    """Batch submissions under one key prefix, on a single Redis or on Redis Cluster."""

    def __init__(self, redis: AnyRedis, *, key_prefix: str) -> None:
        self.redis = redis
        self.keys = RecordKeys(key_prefix)
        self._script = redis.register_script(scripts.SUBMISSION)

    async def _run(self, submission: str, op: Operation, *args: str | int) -> SubmissionAnswer:
        token = args[0]
        reply = await self._script(keys=[self.keys.batch(submission)], args=[op, token, *args[1:]])
        answer, epoch, batch = (_text(x) for x in reply[:3])
        return SubmissionAnswer(answer, epoch, batch or None, reply[3] == 1)

    async def intent(
        self,
        submission: str,
        token: str,
        *,
        provider: str,
        model: str,
        requests: list[tuple[str, str]],
        now_ms: int,
    ) -> SubmissionAnswer:
        """Record the submission before it is sent (step 2), and list it among the unfinished."""
        answer = await self._run(
            submission,
            "intent",
            token,
            provider,
            model,
            orjson.dumps(requests).decode(),
            now_ms,
            SUBMISSION_TTL_S,
        )
        if answer.answer == "intent":
            await self.redis.sadd(self.keys.batches(), submission)
        return answer

    async def created(
        self, submission: str, token: str, epoch: str, batch: str, now_ms: int
    ) -> SubmissionAnswer:
        """The provider accepted it as ``batch`` (step 4); fenced by owner and epoch."""
        return await self._run(submission, "created", token, epoch, batch, now_ms)

    async def abandon(self, submission: str, token: str, dead: str, epoch: str) -> SubmissionAnswer:
        """Never to be created: when none is recorded, or its submitter ``dead`` (seen dead at
        ``epoch``) still holds it in ``intent``. Answers ``created`` when it was."""
        return await self._run(submission, "abandon", token, dead, epoch, SUBMISSION_TTL_S)

    async def adopt(
        self, submission: str, token: str, dead: str, epoch: str, batch: str, now_ms: int
    ) -> SubmissionAnswer:
        """Its dead submitter's batch was found at the provider: this worker polls it now."""
        return await self._run(submission, "adopt", token, dead, epoch, batch, now_ms)

    async def lease(self, submission: str, token: str, dead: str, epoch: str) -> SubmissionAnswer:
        """Take over polling from ``dead``, seen dead while holding it at ``epoch``."""
        return await self._run(submission, "lease", token, dead, epoch)

    async def finish(self, submission: str, token: str, epoch: str) -> bool:
        """Every line is settled: forget the submission (only its lease holder may)."""
        answer = await self._run(submission, "finish", token, epoch)
        if answer.answer != "finished":
            return False
        await self.redis.srem(self.keys.batches(), submission)
        return True

    async def forget(self, submission: str) -> None:
        """Drop an abandoned submission from the unfinished once none of its requests is left in
        it (its marker expires by itself)."""
        await self.redis.srem(self.keys.batches(), submission)

    async def unfinished(self) -> list[str]:
        """The IDs of every submission not yet finished, or abandoned with requests left in it."""
        return sorted(_text(x) for x in await self.redis.smembers(self.keys.batches()))

    async def get(self, submission: str, *, requests: bool = True) -> Submission | None:
        """The submission as stored; without its list of requests (which may hold 100,000)
        unless ``requests``."""
        key = self.keys.batch(submission)
        if requests:
            raw = await self.redis.hgetall(key)
        else:
            names = [f for f in BatchField if f != BatchField.REQUESTS]
            values = await self.redis.hmget(key, names)
            raw = {name: value for name, value in zip(names, values, strict=True) if value}
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        requests_seen = orjson.loads(fields.get(BatchField.REQUESTS, "[]"))
        submitted = fields.get(BatchField.SUBMITTED_AT_MS)
        return Submission(
            id=submission,
            state=fields.get(BatchField.STATE, ""),
            owner=fields.get(BatchField.OWNER),
            epoch=fields.get(BatchField.EPOCH, "0"),
            provider=fields.get(BatchField.PROVIDER, ""),
            model=fields.get(BatchField.MODEL, ""),
            batch=fields.get(BatchField.BATCH),
            requests=[(str(r), str(c)) for r, c in requests_seen],
            created_at_ms=int(fields.get(BatchField.CREATED_AT_MS, "0")),
            submitted_at_ms=int(submitted) if submitted else None,
        )

    async def lines(self, request_ids: list[str]) -> list[LineRecord]:
        """The records of a batch's requests, read in one pipeline (one key per command, so it
        runs on Redis Cluster too)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in request_ids:
                pipe.hmget(self.keys.record(rid), list(_LINE_FIELDS))
            rows = await pipe.execute()
        found = []
        for rid, (state, submission, owner, emitted, calls, request, source) in zip(
            request_ids, rows, strict=True
        ):
            found.append(
                LineRecord(
                    request_id=rid,
                    state=_text(state) if state is not None else None,
                    submission=_text(submission) if submission is not None else None,
                    owner=_text(owner) if owner is not None else None,
                    emitted=emitted is not None and _text(emitted) == "1",
                    calls=int(_text(calls)) if calls is not None else 0,
                    request=request.encode() if isinstance(request, str) else request,
                    source=_text(source) if source is not None else None,
                )
            )
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
