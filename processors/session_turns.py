"""Sessions in the worker: a session's requests answered one at a time, in offset order, each
with the session's history in front and its turn appended once answered.

Order. A session's requests share a partition (they are produced with the session ID as their
key), and the worker starts their tasks in offset order. :meth:`SessionTurns.enter` runs right
after the event is decoded, before the task's first wait, so the per-session queue it joins is
in offset order; :meth:`SessionTurns.wait` lets a request go only once the one before it in the
queue has finished here and its record is no longer claimed by a worker (the one before was
taken over by another worker after this one stalled: the other still answers it). Requests of
other sessions, and requests without one, never wait for each other.

After a rebalance or a crash the next owner reads the unfinished events again, in order, and
queues them the same way; a request whose outcome was stored already is a duplicate (nothing is
called or appended), and appends are idempotent per request ID, so the session's turns stay in
offset order and never interleave.

History. :meth:`SessionTurns.prepare` refuses, before any provider call, a request in another
client's session (:class:`~llmstream.core.sessions.SessionOwnerMismatch`) or a turn larger than
the session may hold (:class:`~llmstream.core.sessions.SessionTurnTooLarge`), and puts the
session's stored messages in front of the request's own. :meth:`SessionTurns.append` adds the
request's messages, the tool loop's messages and the answer, as one turn, before the outcome is
stored: the next request of the session sees it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.record import ClaimUnavailable, RecordStore, State
from llmstream.core.sessions import SessionStore
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.providers import Completion
from llmstream.processors.tool_loop import Persist
from llmstream.schemas.models import ChatMessage, LLMRequest

__all__ = ["SessionTurns", "Turn"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_REDIS_ERRORS = (RedisError, RedisClusterException)


@dataclass(eq=False)
class Turn:
    """One request's place in its session's queue."""

    session_id: str
    request_id: str
    done: asyncio.Future[None]
    after: Turn | None  # the request before it in the queue, until that one is done


class SessionTurns:
    """The sessions of every request in flight in one worker process."""

    def __init__(
        self,
        store: SessionStore,
        *,
        records: RecordStore,
        metrics: WorkerMetrics,
        persist: Persist,
    ) -> None:
        self._store = store
        self._records = records
        self._metrics = metrics
        self._persist = persist
        self._last: dict[str, Turn] = {}  # per session, the last request queued

    def enter(self, request: LLMRequest) -> Turn | None:
        """Queue ``request`` behind its session's requests in flight here; call it before the
        task's first wait. None for a request without a session."""
        if request.session_id is None:
            return None
        before = self._last.get(request.session_id)
        done = asyncio.get_running_loop().create_future()
        turn = Turn(request.session_id, request.request_id, done, before)
        self._last[request.session_id] = turn
        return turn

    async def wait(self, turn: Turn) -> None:
        """Until the request before ``turn`` in its session is answered."""
        before = turn.after
        if before is None:
            return
        await asyncio.shield(before.done)
        delay = 0.05
        while await self._persist(lambda: self._state(before.request_id), "read a record"):
            # Another worker took it over from this one and still answers it.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def leave(self, turn: Turn) -> None:
        """``turn``'s request is finished here; the next one goes once those before it are."""
        before = turn.after
        if before is None or before.done.done():
            self._finish(turn)
        else:  # cancelled while waiting: still not before the requests ahead of it
            before.done.add_done_callback(lambda _: self._finish(turn))

    def _finish(self, turn: Turn) -> None:
        turn.after = None
        if not turn.done.done():
            turn.done.set_result(None)
        if self._last.get(turn.session_id) is turn:
            del self._last[turn.session_id]

    async def _state(self, request_id: str) -> bool:
        """Whether the request's record is claimed (a worker is answering it)."""
        try:
            return await self._records.state(request_id) == State.CLAIMED
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot read the record: {exc}") from exc

    async def prepare(self, request: LLMRequest) -> LLMRequest:
        """``request`` with its session's history in front; raises SessionError (another
        client's session, or a turn the session cannot hold)."""
        if request.session_id is None:
            return request
        self._store.check_new_messages(request.messages)
        session_id, owner = request.session_id, request.client_id
        history = await self._persist(
            lambda: _redis(self._store.history(session_id, owner)), "read a session"
        )
        if not history:
            return request
        return request.model_copy(update={"messages": [*history, *request.messages]})

    async def append(
        self,
        request: LLMRequest,
        answer: Completion,
        loop_messages: Sequence[ChatMessage],
        *,
        cost_usd: float | None,
    ) -> None:
        """Append the request's turn (its messages, the loop's, the answer) to its session,
        once; raises SessionError."""
        assert request.session_id is not None
        session_id = request.session_id
        new, tools, last = _turn(request.messages, loop_messages, answer)
        appended = await self._persist(
            lambda: _redis(
                self._store.append(
                    session_id,
                    request.request_id,
                    new,
                    last,
                    owner=request.client_id,
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    cost_usd=cost_usd,
                    tool_messages=tools,
                )
            ),
            "append to a session",
        )
        if appended.dropped_turns:
            self._metrics.session_turns_dropped.inc(appended.dropped_turns)
            log.info(
                "session %s: %d oldest turns dropped to keep it within its caps",
                session_id,
                appended.dropped_turns,
            )


async def _redis(operation: Awaitable[T]) -> T:
    """A session store operation, its Redis failure as the pipeline retries it."""
    try:
        return await operation
    except _REDIS_ERRORS as exc:
        raise ClaimUnavailable(f"session store unreachable: {exc}") from exc


def _turn(
    messages: Sequence[ChatMessage], loop_messages: Sequence[ChatMessage], answer: Completion
) -> tuple[list[ChatMessage], list[ChatMessage], ChatMessage]:
    """The turn as the session store takes it: new messages, tool messages, last message.

    An answer with no text and no tool calls (a content filter, say) cannot be a message: the
    turn then ends with the message before it, and nothing is made up.
    """
    tail = list(loop_messages)
    if answer.content or answer.tool_calls:
        tail.append(
            ChatMessage(
                role="assistant",
                content=answer.content or None,
                tool_calls=list(answer.tool_calls) or None,
            )
        )
    if tail:
        return list(messages), tail[:-1], tail[-1]
    return list(messages[:-1]), [], messages[-1]
