"""The worker's tool loop: a request's server-side tools run between its model calls.

A request names the operator-registered tools it may use (``server_tools``). The worker offers
them to the model beside the request's own ``tools`` (:meth:`ToolLoop.offer`; a name nobody
registered fails the request as ``invalid_request`` before any call). Then, for as long as the
model answers with calls of server tools:

1. the answer (an assistant message with its ``tool_calls``) is kept in the request's journal;
2. each call runs (:class:`~llmstream.core.tools.ToolExecutor`: a failing, slow or non-JSON tool,
   a name that is not offered, arguments that do not fit, all become an error result the model
   reads) and its result is kept in the journal;
3. the model is called again with the assistant message and one ``tool`` message per call
   (its content is the result's JSON text).

Every model call goes through traffic control (:meth:`TrafficControl.complete`: cache, limits,
circuits, fallbacks, retries, the dedup gate before each attempt) like any call; tokens and cost
add up over the loop and ``attempts`` counts every call. The loop ends with the first answer
that calls no server tool: a text, or calls of the request's own (client) ``tools``, which go
back to the client as ``tool_calls`` with any server calls of the same answer, none of them run.
A model answer that calls server tools after ``LLMSTREAM_MAX_TOOL_STEPS`` answers that did
fails the request as ``max_tool_steps`` (:class:`ToolStepsExhausted`), with the steps so far.
A forced ``tool_choice`` (a function, or ``required``) applies to the first call only: forced
again, the model could never answer.

The journal (:class:`StepJournal`), ``{prefix}steps:{<request id>}`` in Redis (the request ID is
the hash tag: the record's slot), is written only while this worker owns the request's claim,
and before the loop goes on. A worker that takes the request over (the first crashed) reads it
and goes on from the last kept point: no model call and no tool call is made again for a kept
step. A tool call that ran but whose result was not kept yet runs again, with the same
``Idempotency-Key`` header (a digest of the request ID and the call's ID), so the tool can tell
the repeat. The journal is dropped once the request's outcome is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import orjson
from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.errors import LLMStreamError
from llmstream.core.record import AnyRedis, ClaimUnavailable, RecordKeys
from llmstream.core.tools import ToolExecutor, ToolRegistry, ToolResult
from llmstream.processors.dedup import NotOwner
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.providers import Completion, Provider
from llmstream.processors.streaming import AnswerStream
from llmstream.processors.traffic import CallGate, TrafficControl, TrafficProgress
from llmstream.schemas.models import ChatMessage, LLMRequest, ToolCall, ToolStep

__all__ = ["LoopProgress", "StepJournal", "ToolLoop", "ToolStepsExhausted"]

T = TypeVar("T")

_REDIS_ERRORS = (RedisError, RedisClusterException)

# KEYS[1] the request's record, KEYS[2] its journal. ARGV: the worker's token, the TTL (s), then
# the entries to append. Refused (0) once another worker owns the record; a record with no owner
# (lost state, as the record's settle reads it) is nobody else's.
_APPEND = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class ToolStepsExhausted(LLMStreamError):
    """The model kept calling server tools after ``LLMSTREAM_MAX_TOOL_STEPS`` answers that did."""

    error_type = "max_tool_steps"

    def __init__(self, max_steps: int) -> None:
        super().__init__(
            f"the model called server tools in {max_steps} answers and asked for more: "
            f"LLMSTREAM_MAX_TOOL_STEPS is {max_steps}"
        )


class Persist(Protocol):
    """Runs a Redis operation until it succeeds (the pipeline's fail-closed retry)."""

    def __call__(self, operation: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]: ...


class StepJournal:
    """The kept steps of requests in a tool loop or a session: one Redis list per request."""

    def __init__(self, redis: AnyRedis, *, key_prefix: str, worker_token: str, ttl_s: int) -> None:
        self._redis = redis
        self._keys = RecordKeys(key_prefix)
        self._token = worker_token
        self._ttl_s = ttl_s
        self._append = redis.register_script(_APPEND)

    def key(self, request_id: str) -> str:
        # The record's hash tag: one slot for the record and its journal.
        return self._keys.steps(request_id)

    async def load(self, request_id: str) -> list[dict[str, Any]]:
        """The entries kept for ``request_id``, oldest first."""
        try:
            raw = await self._redis.lrange(self.key(request_id), 0, -1)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot read the tool steps: {exc}") from exc
        return [orjson.loads(entry) for entry in raw]

    async def add(self, request_id: str, *entries: dict[str, Any]) -> None:
        """Keep ``entries``; raises NotOwner when another worker owns the request now."""
        try:
            kept = await self._append(
                keys=[self._keys.record(request_id), self.key(request_id)],
                args=[self._token, self._ttl_s, *(orjson.dumps(e) for e in entries)],
            )
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot keep a tool step: {exc}") from exc
        if not int(kept):
            raise NotOwner(f"{request_id} was taken over by another worker")

    async def drop(self, request_id: str) -> None:
        try:
            await self._redis.delete(self.key(request_id))
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot drop the tool steps: {exc}") from exc


@dataclass
class LoopProgress:
    """What one request's loop did so far, readable whether it succeeded or not."""

    steps: list[ToolStep] = field(default_factory=list)
    # The assistant messages that called server tools and the tool messages answering them.
    messages: list[ChatMessage] = field(default_factory=list)
    rounds: int = 0  # answers whose server tool calls ran
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None  # of the calls whose cost is known
    answers: int = 0
    cached_answers: int = 0
    last: Completion | None = None  # the last answer as the provider gave it
    final_kept: bool = False  # the final answer is in the journal already

    @property
    def cached(self) -> bool:
        """Every answer came from the cache (no provider call at all)."""
        return self.answers > 0 and self.cached_answers == self.answers

    def count(self, completion: Completion, cost_usd: float | None, cached: bool) -> None:
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.total_tokens += completion.total_tokens
        if cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost_usd
        self.answers += 1
        self.cached_answers += cached
        self.last = completion

    def total(self, completion: Completion) -> Completion:
        """The last answer with the loop's usage."""
        if self.answers == 1 and completion is self.last:
            return completion  # the loop's only answer: its usage is the loop's
        return replace(
            completion,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
        )


@dataclass
class _Round:
    """An answer calling server tools, and the results of its calls so far, by call ID."""

    answer: Completion
    results: dict[str, tuple[ToolStep, str]] = field(default_factory=dict)


class ToolLoop:
    """Model calls and server-side tool calls for every request of one worker process."""

    def __init__(
        self,
        *,
        traffic: TrafficControl,
        journal: StepJournal,
        metrics: WorkerMetrics,
        persist: Persist,
        max_steps: int,
        tools: ToolExecutor | None = None,
    ) -> None:
        self._traffic = traffic
        self._journal = journal
        self._metrics = metrics
        self._persist = persist
        self._max_steps = max_steps
        self._tools = tools
        self._registry = tools.registry if tools is not None else ToolRegistry(())

    @staticmethod
    def journals(request: LLMRequest) -> bool:
        """Whether ``request`` keeps a journal: it may run tools, or it belongs to a session
        (whose answer is kept before it is appended)."""
        return bool(request.server_tools) or request.session_id is not None

    def offer(self, request: LLMRequest) -> LLMRequest:
        """``request`` with its server tools added to its ``tools``; raises UnknownTool."""
        if not request.server_tools:
            return request
        offered = self._registry.openai_tools(request.server_tools)
        return request.model_copy(update={"tools": [*(request.tools or ()), *offered]})

    async def complete(
        self,
        request: LLMRequest,
        sent: LLMRequest,
        provider: Provider,
        model: str,
        traffic: TrafficProgress,
        loop: LoopProgress,
        *,
        gate: CallGate | None = None,
        chunks: AnswerStream | None = None,
    ) -> Completion:
        """The final answer to ``request``, sending ``sent`` (the request as the model sees it:
        history in front, server tools offered). Raises ProviderError, ToolStepsExhausted and
        NotOwner; ``traffic`` and ``loop`` say what was done either way."""
        round_: _Round | None = None
        if self.journals(request):
            final, round_ = await self._resume(request.request_id, traffic, loop)
            if final is not None:
                loop.final_kept = True
                return loop.total(final)
        while True:
            if round_ is not None:
                await self._run_round(request, round_, loop)
                if gate is not None:
                    gate.call_over()  # kept: a drain may stop the request here, nothing is lost
            step = sent
            if loop.rounds:
                step = sent.model_copy(
                    update={"messages": [*sent.messages, *loop.messages], "tool_choice": None}
                )
            traffic.cost_usd, traffic.cached = None, False
            answer, _ = await self._traffic.complete(
                step, provider, model, traffic, gate=gate, chunks=chunks
            )
            loop.count(answer, traffic.cost_usd, traffic.cached)
            if not self._calls_server_tools(request, answer):
                return loop.total(answer)
            if loop.rounds >= self._max_steps:
                raise ToolStepsExhausted(self._max_steps)
            round_ = _Round(answer)
            await self._keep(request.request_id, _answer_entry("answer", answer, traffic))

    async def keep_final(
        self, request_id: str, loop: LoopProgress, traffic: TrafficProgress
    ) -> None:
        """Keep the loop's final answer (before a session is changed with it): a worker that
        takes the request over then appends this answer, not a second one."""
        assert loop.last is not None, "kept once the loop has answered"
        if loop.final_kept:
            return
        await self._keep(request_id, _answer_entry("final", loop.last, traffic))

    async def forget(self, request_id: str) -> None:
        """Drop the journal of a request whose outcome is stored."""
        await self._journal.drop(request_id)

    def _calls_server_tools(self, request: LLMRequest, answer: Completion) -> bool:
        if not request.server_tools or not answer.tool_calls:
            return False
        client = {tool.function.name for tool in request.tools or ()}
        return not any(call.function.name in client for call in answer.tool_calls)

    async def _resume(
        self, request_id: str, traffic: TrafficProgress, loop: LoopProgress
    ) -> tuple[Completion | None, _Round | None]:
        """Go on from the journal: the kept final answer, or the round to finish (if any)."""
        entries = await self._persist(lambda: self._journal.load(request_id), "read the steps")
        round_: _Round | None = None
        for entry in entries:
            traffic.attempts = max(traffic.attempts, int(entry.get("attempts", 0)))
            kind = entry["kind"]
            if kind == "result":
                assert round_ is not None, "a tool result is kept after its answer"
                step = ToolStep.model_validate(entry["step"])
                round_.results[step.call_id] = (step, entry["content"])
                continue
            if round_ is not None:
                self._close_round(round_, loop)
                round_ = None
            answer = Completion(
                **{**entry["completion"], "tool_calls": _calls(entry["completion"])}
            )
            loop.count(answer, entry.get("cost_usd"), bool(entry.get("cached")))
            if kind == "final":
                # The tier that served the kept answer, not the one a call now would get.
                traffic.service_tier = entry.get("service_tier", traffic.service_tier)
                return answer, None
            round_ = _Round(answer)
        return None, round_

    async def _run_round(self, request: LLMRequest, round_: _Round, loop: LoopProgress) -> None:
        """Run the round's calls that have no kept result, keep each result, close the round."""
        missing = [c for c in round_.answer.tool_calls if c.id not in round_.results]
        if missing:
            results = await asyncio.gather(*(self._run_call(request, call) for call in missing))
            for call, (step, content) in zip(missing, results, strict=True):
                round_.results[call.id] = (step, content)
        self._close_round(round_, loop)

    async def _run_call(self, request: LLMRequest, call: ToolCall) -> tuple[ToolStep, str]:
        name, arguments = call.function.name, call.function.arguments
        if name not in request.server_tools or self._tools is None:
            result = ToolResult.failed("unknown_tool", f"no tool named {name!r} is offered")
        else:
            key = hashlib.sha256(f"{request.request_id}\n{call.id}".encode()).hexdigest()[:32]
            result = await self._tools.execute(name, arguments, idempotency_key=key)
            self._metrics.tool_latency.labels(name).observe(result.latency_ms / 1000)
        label = name if name in self._registry else "unknown"
        self._metrics.tool_calls.labels(label, result.error_type or "ok").inc()
        step = ToolStep(
            tool=name,
            call_id=call.id,
            arguments=arguments,
            status=result.status,
            latency_ms=result.latency_ms,
            error=result.error,
        )
        entry = {"kind": "result", "step": step.model_dump(mode="json"), "content": result.content}
        await self._keep(request.request_id, entry)
        return step, result.content

    async def _keep(self, request_id: str, entry: dict[str, Any]) -> None:
        """Keep ``entry`` before the loop goes on (retried while Redis is unreachable)."""
        await self._persist(lambda: self._journal.add(request_id, entry), "keep a tool step")

    def _close_round(self, round_: _Round, loop: LoopProgress) -> None:
        """The round's steps and messages, in the order of its calls."""
        answer = round_.answer
        loop.messages.append(
            ChatMessage(
                role="assistant", content=answer.content or None, tool_calls=list(answer.tool_calls)
            )
        )
        for call in answer.tool_calls:
            step, content = round_.results[call.id]
            loop.steps.append(step)
            loop.messages.append(ChatMessage(role="tool", content=content, tool_call_id=call.id))
        loop.rounds += 1


def _answer_entry(kind: str, answer: Completion, traffic: TrafficProgress) -> dict[str, Any]:
    completion = {
        "content": answer.content,
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.total_tokens,
        "provider": answer.provider,
        "model": answer.model,
        "tool_calls": [call.model_dump(mode="json") for call in answer.tool_calls],
    }
    return {
        "kind": kind,
        "attempts": traffic.attempts,
        "cost_usd": traffic.cost_usd,
        "cached": traffic.cached,
        "service_tier": traffic.service_tier,
        "completion": completion,
    }


def _calls(completion: dict[str, Any]) -> tuple[ToolCall, ...]:
    calls: Sequence[Any] = completion.get("tool_calls") or ()
    return tuple(ToolCall.model_validate(call) for call in calls)
