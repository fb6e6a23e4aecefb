"""Sessions in the worker: history in front of a request, its turn appended once answered, and a
session's requests answered one at a time in offset order while others run. Real Redis, the real
adapters over loopback HTTP to the provider simulator through a recording proxy (which shows
what each provider call was sent), and a worker process on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from llmstream.core.sessions import Appended, SessionStore
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.codec import encode
from llmstream.schemas.models import ChatMessage, LLMRequest
from tests.conftest import Services
from tests.harness import produce, read_answers, request, running_worker
from tests.inprocess import SOURCE, Rig, sim
from tests.loopback import LoopbackServer, Received, Reply
from tests.test_tool_loop import spec, tool_pipeline, weather

__all__ = ["sim"]  # the module's provider simulator fixture

_PROVIDER_PATHS = ("/v1/chat/completions", "/v1/messages")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class ProviderProxy:
    """Forwards every call to the simulator, keeping what each provider call was sent; the calls
    of a held request ID wait until it is released. It stands in for the simulator wherever only
    its ``url`` is used (the in-process rig, a worker process's environment)."""

    def __init__(self, simulator: SimulatorServer) -> None:
        self._simulator = simulator
        self._server = LoopbackServer(self._forward)
        self._held: dict[str, asyncio.Event] = {}
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self._server.url

    def hold(self, request_id: str) -> asyncio.Event:
        """Hold ``request_id``'s provider calls until the returned event is set."""
        return self._held.setdefault(request_id, asyncio.Event())

    def sent(self, request_id: str) -> list[dict[str, Any]]:
        """The bodies of ``request_id``'s provider calls, in arrival order."""
        return [
            call.json()
            for call in self._server.received
            if call.path in _PROVIDER_PATHS
            and call.headers.get("x-client-request-id") == request_id
        ]

    async def _forward(self, received: Received) -> Reply:
        held = self._held.get(received.headers.get("x-client-request-id", ""))
        if held is not None:
            await held.wait()
        assert self._http is not None
        headers = {k: v for k, v in received.headers.items() if k not in _HOP_HEADERS}
        async with self._http.request(
            received.method,
            self._simulator.url + received.path,
            params=received.query,
            data=received.body,
            headers=headers,
        ) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            return Reply(answer.status, kept, body)

    async def __aenter__(self) -> ProviderProxy:
        self._http = aiohttp.ClientSession()
        await self._server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for held in self._held.values():
            held.set()
        await self._server.stop()
        if self._http is not None:
            await self._http.close()


@pytest_asyncio.fixture
async def proxy(sim: SimulatorServer) -> AsyncIterator[ProviderProxy]:
    async with ProviderProxy(sim) as server:
        yield server


def sessions_of(r: Rig) -> SessionStore:
    return SessionStore(r.redis, key_prefix=r.settings.redis_key_prefix, params=r.settings)


def contents(body: dict[str, Any]) -> list[str | None]:
    return [m.get("content") for m in body["messages"]]


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_a_sessions_requests_in_flight_together_are_answered_one_at_a_time_in_order(
    services: Services, proxy: ProviderProxy
) -> None:
    sid, other_sid = f"sess-{uuid.uuid4().hex}", f"sess-{uuid.uuid4().hex}"
    turns = [request(f"{sid}-{i}", text=f"turn {i}", session_id=sid) for i in (1, 2, 3)]
    other = request(f"{other_sid}-1", text="another conversation", session_id=other_sid)
    async with tool_pipeline(services, proxy) as r:
        first_call = proxy.hold(turns[0].request_id)
        # Started in offset order, as the worker starts them.
        tasks = [asyncio.create_task(r.process(x)) for x in [*turns, other]]

        # The other session is not held up behind this one; this one's next turns wait.
        await until(lambda: [x.request_id for x in r.responses()] == [other.request_id], "other")
        assert proxy.sent(turns[1].request_id) == proxy.sent(turns[2].request_id) == []
        first_call.set()
        await asyncio.gather(*tasks)

        answered = [x.request_id for x in r.responses()]
        assert answered == [other.request_id, *(x.request_id for x in turns)]
        [third] = proxy.sent(turns[2].request_id)
        assert contents(third) == [
            "turn 1",
            "echo: turn 1",
            "turn 2",
            "echo: turn 2",
            "turn 3",
        ]
        assert {x.session_id for x in r.responses()} == {sid, other_sid}
        session = await sessions_of(r).get(sid)
        assert session is not None and session.requests == 3
        assert [m.content for m in session.messages] == [*contents(third), "echo: turn 3"]
        total = sum(x.total_tokens for x in r.responses() if x.session_id == sid)
        assert session.prompt_tokens + session.completion_tokens == total


async def test_a_request_in_another_clients_session_is_refused_before_any_call(
    services: Services, proxy: ProviderProxy
) -> None:
    async with tool_pipeline(services, proxy) as r:
        store = sessions_of(r)
        session = await store.create(owner="alice")
        await r.process(request("mine", text="hello", client_id="alice", session_id=session.id))
        for rid, client in (("theirs", "bob"), ("nobodys", None)):
            await r.process(
                request(rid, text="what did alice say?", client_id=client, session_id=session.id)
            )

        [answered] = r.responses()
        assert answered.request_id == "mine"
        refused = r.errors()
        assert [(e.request_id, e.error_type) for e in refused] == [
            ("theirs", "invalid_request"),
            ("nobodys", "invalid_request"),
        ]
        assert all("belongs to another client" in e.message for e in refused)
        assert all(e.session_id == session.id for e in refused)
        assert proxy.sent("theirs") == proxy.sent("nobodys") == []
        kept = await store.get(session.id)
        assert kept is not None and [m.content for m in kept.messages] == ["hello", "echo: hello"]


async def test_a_turn_larger_than_a_session_holds_is_refused_before_any_call(
    services: Services, proxy: ProviderProxy
) -> None:
    async with tool_pipeline(services, proxy, session_max_messages=2) as r:
        too_long = LLMRequest(
            request_id="too-long",
            model="openai/gpt-4o-mini",
            messages=[
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="hello"),
            ],
            session_id="sess-small",
        )
        await r.process(too_long)

        [error] = r.errors()
        assert error.error_type == "invalid_request"
        assert "LLMSTREAM_SESSION_MAX_MESSAGES" in error.message
        assert proxy.sent("too-long") == []
        assert await sessions_of(r).get("sess-small") is None


async def test_a_sessions_history_keeps_its_tool_loop_and_the_next_request_is_sent_it(
    services: Services, proxy: ProviderProxy
) -> None:
    sid = f"sess-{uuid.uuid4().hex}"
    async with (
        LoopbackServer(weather) as tool,
        tool_pipeline(services, proxy, spec("get_weather", tool.url)) as r,
    ):
        first = request(
            f"{sid}-1", text="get_weather in Lisbon", session_id=sid, server_tools=["get_weather"]
        )
        await r.process(first)
        await r.process(request(f"{sid}-2", text="and tomorrow?", session_id=sid))

        one, two = r.responses()
        assert len(one.tool_steps) == 1 and two.tool_steps == []
        [sent] = proxy.sent(f"{sid}-2")
        roles = [m["role"] for m in sent["messages"]]
        assert roles == ["user", "assistant", "tool", "assistant", "user"]
        assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert sent["messages"][2]["tool_call_id"] == one.tool_steps[0].call_id
        assert sent["messages"][3]["content"] == one.content
        session = await sessions_of(r).get(sid)
        assert session is not None and len(session.messages) == 6


async def test_requests_of_one_session_produced_back_to_back_are_answered_in_order(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    tmp_path: Path,
    unique: str,
) -> None:
    sid = f"sess-{unique}"
    first, second = (request(f"{sid}-{i}", text=f"question {i}", session_id=sid) for i in (1, 2))
    # Another session's request behind them on the same partition (the same key).
    later = request(f"other-{unique}", text="unrelated", session_id=f"other-{unique}")
    async with ProviderProxy(simulator) as proxy:
        held = proxy.hold(first.request_id)
        async with running_worker(settings, proxy.url, f"group-{unique}", tmp_path):
            key = sid.encode()
            events = [(key, encode(x)) for x in (first, second, later)]
            await produce(settings.kafka_bootstrap_servers, settings.requests_topic, events)

            [answer] = await read_answers(settings, 1, timeout=120)
            assert answer.request_id == later.request_id
            assert proxy.sent(second.request_id) == []  # not while the first is unanswered
            held.set()
            answers = await read_answers(settings, 3, timeout=120)

        assert {a.request_id for a in answers} == {
            first.request_id,
            second.request_id,
            later.request_id,
        }
        [sent] = proxy.sent(second.request_id)
        assert contents(sent) == ["question 1", "echo: question 1", "question 2"]


class DiesAfterAppending(SessionStore):
    """A session store whose first append is the last thing its worker does: the turn is
    appended, then the task stops as a crash would stop it, before the outcome is stored."""

    died = False

    async def append(self, *args: Any, **kwargs: Any) -> Appended:
        appended = await super().append(*args, **kwargs)
        if not self.died:
            self.died = True
            raise asyncio.CancelledError("the worker died")
        return appended


async def test_a_worker_that_dies_between_appending_and_storing_leaves_the_answer_it_appended(
    services: Services, proxy: ProviderProxy
) -> None:
    sid = f"sess-{uuid.uuid4().hex}"
    turn = request(f"{sid}-1", text="remember me", session_id=sid)
    async with tool_pipeline(services, proxy) as r:
        store = DiesAfterAppending(
            r.redis, key_prefix=r.settings.redis_key_prefix, params=r.settings
        )
        dying = r.processor_with(sessions=store)
        with pytest.raises(asyncio.CancelledError):
            await dying.process(encode(turn), None, SOURCE)
        assert r.responses() == [] and len(proxy.sent(turn.request_id)) == 1

        # The request is read again (here by the same worker, its claim given back).
        await r.process(turn)

        [response] = r.responses()
        assert response.content == "echo: remember me"
        assert len(proxy.sent(turn.request_id)) == 1  # the kept answer: no second call
        session = await store.get(sid)
        assert session is not None and session.requests == 1
        assert [m.content for m in session.messages] == ["remember me", "echo: remember me"]
