"""``/v1/sessions`` on an app built as the ingress builds its own (error handlers, the
authenticating middleware, the parts on ``app.state``), against the real Redis: a client sees,
and deletes, only its own sessions; another's answers exactly as one that does not exist."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from llmstream.core.connections import redis_client
from llmstream.core.sessions import SessionParams, SessionStore
from llmstream.core.tools import ToolExecutor, ToolRegistry
from llmstream.devtools.processes import free_port
from llmstream.ingress import openai_compat, requests_api, sessions_api, tools_api
from llmstream.ingress.app import Authenticate, BodyLimit
from llmstream.ingress.auth import ApiKeys
from llmstream.ingress.errors import install_error_handlers
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.quota import ClientQuota
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.models import ChatMessage
from tests.conftest import Services
from tests.test_ingress import API_KEYS, KEY_A, KEY_B

pytestmark = pytest.mark.integration


def api_settings(services: Services, unique: str, **overrides: Any) -> IngressSettings:
    """The ingress's settings for this test: its own Redis key prefix, no rate limit."""
    values: dict[str, Any] = {
        "redis_url": services.redis_url,
        "redis_key_prefix": f"test-{unique}:",
        "rate_limit_per_minute": 0,
        **overrides,
    }
    return IngressSettings(**values)


@contextlib.asynccontextmanager
async def running_parts(
    app: FastAPI, registry: ToolRegistry, params: SessionParams
) -> AsyncIterator[None]:
    """What the ingress connects while it runs, for the sessions and tools routers."""
    settings: IngressSettings = app.state.settings
    redis = redis_client(settings)
    async with aiohttp.ClientSession() as http:
        app.state.quota = ClientQuota(
            redis, key_prefix=settings.redis_key_prefix, per_minute=0, burst=1
        )
        app.state.sessions = SessionStore(
            redis, key_prefix=settings.redis_key_prefix, params=params
        )
        app.state.tools = ToolExecutor(registry, http)
        try:
            yield
        finally:
            for name in ("quota", "sessions", "tools"):
                delattr(app.state, name)
            await redis.aclose()


def api_app(
    settings: IngressSettings,
    registry: ToolRegistry | None = None,
    params: SessionParams | None = None,
) -> FastAPI:
    """The sessions and tools routers in an app made as ``create_app`` makes the ingress; its
    lifespan connects the parts (for a server), or a test enters :func:`running_parts`."""
    tools = registry if registry is not None else ToolRegistry(())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_parts(app, tools, params or SessionParams()):
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = IngressMetrics(CollectorRegistry())
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.tool_registry = tools
    install_error_handlers(
        app,
        validation_status={openai_compat.CHAT_PATH: 400},
        body_tags=requests_api.BODY_TAGS,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate)
    app.include_router(sessions_api.routes.router())
    app.include_router(tools_api.routes.router())
    return app


@contextlib.asynccontextmanager
async def in_process(
    app: FastAPI, params: SessionParams | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling ``app`` over ASGI, with its parts connected."""
    async with (
        running_parts(app, app.state.tool_registry, params or SessionParams()),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ingress") as client,
    ):
        yield client


def key(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def message(role: str, content: str | None, **extra: Any) -> ChatMessage:
    return ChatMessage.model_validate({"role": role, "content": content, **extra})


async def test_a_client_sees_and_deletes_only_its_own_sessions(
    services: Services, unique: str
) -> None:
    app = api_app(api_settings(services, unique, api_keys=API_KEYS))
    async with in_process(app) as client:
        created = await client.post("/v1/sessions", headers=key(KEY_A))
        assert created.status_code == 201
        session_id = created.json()["id"]
        assert created.json() == {
            "id": session_id,
            "object": "session",
            "created_at": created.json()["created_at"],
        }
        empty = await client.get(f"/v1/sessions/{session_id}", headers=key(KEY_A))
        # The worker answers a request of client a in the session, with a tool call on the way.
        store: SessionStore = app.state.sessions
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        await store.append(
            session_id,
            "r1",
            [message("user", "hello")],
            message("assistant", "hi there"),
            owner="a",
            prompt_tokens=12,
            completion_tokens=5,
            cost_usd=0.25,
            tool_messages=[
                message("assistant", None, tool_calls=[call]),
                message("tool", '{"ok": true}', tool_call_id="c1"),
            ],
        )
        full = await client.get(f"/v1/sessions/{session_id}", headers=key(KEY_A))
        others = await client.get(f"/v1/sessions/{session_id}", headers=key(KEY_B))
        unknown = await client.get("/v1/sessions/sess_nobody", headers=key(KEY_B))
        others_delete = await client.delete(f"/v1/sessions/{session_id}", headers=key(KEY_B))
        anonymous = await client.get(f"/v1/sessions/{session_id}")
        still = await client.get(f"/v1/sessions/{session_id}", headers=key(KEY_A))
        deleted = await client.delete(f"/v1/sessions/{session_id}", headers=key(KEY_A))
        gone = await client.get(f"/v1/sessions/{session_id}", headers=key(KEY_A))
        # A session that a request of client b started belongs to b.
        await store.append(
            "from-kafka", "r2", [message("user", "q")], message("assistant", "a"), owner="b"
        )
        bs = await client.get("/v1/sessions/from-kafka", headers=key(KEY_B))
        not_as = await client.get("/v1/sessions/from-kafka", headers=key(KEY_A))

    assert empty.status_code == 200
    assert empty.json()["messages"] == [] and empty.json()["request_count"] == 0
    assert full.status_code == 200
    body = full.json()
    assert body["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": '{"ok": true}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "hi there"},
    ]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert (body["cost_usd"], body["request_count"]) == (0.25, 1)
    assert body["expires_at"] >= body["created_at"] + 7 * 24 * 3600 - 60
    # Another client's session is indistinguishable from none.
    assert others.status_code == unknown.status_code == 404
    assert others.json() == unknown.json()
    assert others.json()["error"]["code"] == "not_found"
    assert others_delete.status_code == 404 and others_delete.json() == unknown.json()
    assert anonymous.status_code == 401
    assert still.status_code == 200
    assert deleted.status_code == 200
    assert deleted.json() == {"id": session_id, "object": "session.deleted", "deleted": True}
    assert gone.status_code == 404
    assert bs.status_code == 200 and not_as.status_code == 404


async def test_with_authentication_off_every_caller_sees_every_session(
    services: Services, unique: str
) -> None:
    app = api_app(api_settings(services, unique))
    async with in_process(app) as client:
        created = await client.post("/v1/sessions")
        session_id = created.json()["id"]
        store: SessionStore = app.state.sessions
        await store.append(
            session_id, "r1", [message("user", "q")], message("assistant", "a"), owner=None
        )
        await store.append(
            "of-x", "r1", [message("user", "q")], message("assistant", "a"), owner="x"
        )
        mine = await client.get(f"/v1/sessions/{session_id}")
        xs = await client.get("/v1/sessions/of-x")
        deleted = await client.delete("/v1/sessions/of-x")
        control = await client.get("/v1/sessions/bad%01id")
    assert created.status_code == 201
    assert mine.status_code == 200 and len(mine.json()["messages"]) == 2
    assert xs.status_code == 200 and deleted.status_code == 200
    assert control.status_code == 422


async def test_without_redis_the_sessions_api_answers_503(services: Services, unique: str) -> None:
    settings = api_settings(services, unique, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with in_process(api_app(settings)) as client:
        created = await client.post("/v1/sessions")
        read = await client.get("/v1/sessions/s1")
        deleted = await client.delete("/v1/sessions/s1")
    for answer in (created, read, deleted):
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "unavailable"
        assert answer.headers["retry-after"] == "1"
