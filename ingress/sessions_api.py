"""Sessions: ``POST /v1/sessions``, ``GET /v1/sessions/{id}``, ``DELETE /v1/sessions/{id}``.

A session keeps a conversation in Redis (:mod:`llmstream.core.sessions`): a request that names
it with ``session_id`` is answered with the session's history in front of its own messages, and
its new messages and answer are appended. A session created here belongs to the caller; with API
keys on, another client's session answers 404, exactly as one that does not exist (nothing tells
that it does). With authentication off, every caller sees every session.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, Path, Request
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.sessions import Session, SessionStore
from llmstream.ingress.auth import CallerDep, Identity
from llmstream.ingress.errors import ApiError, unavailable
from llmstream.ingress.parts import Routes, part
from llmstream.ingress.requests_api import ERROR_RESPONSES
from llmstream.schemas.models import ChatMessage


def _sessions(request: Request) -> SessionStore:
    return part(request, "sessions", SessionStore)


SessionsDep = Annotated[SessionStore, Depends(_sessions)]

SessionIdPath = Annotated[str, Path(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class SessionCreated(BaseModel):
    """A new, empty session: name it in requests as ``session_id``."""

    id: str
    object: Literal["session"] = "session"
    created_at: int = Field(description="Unix time, seconds")


class SessionUsage(BaseModel):
    """Tokens of every request answered in the session, dropped turns included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SessionView(BaseModel):
    """A session's history (what the next request is answered after) and its totals."""

    id: str
    object: Literal["session"] = "session"
    created_at: int = Field(description="Unix time, seconds")
    expires_at: int = Field(description="Unix time, seconds; each request moves it on")
    messages: list[ChatMessage] = Field(
        description="Oldest first; over the session's caps the oldest turns were dropped"
    )
    usage: SessionUsage
    cost_usd: float = Field(description="Of the requests whose cost was known")
    request_count: int

    @classmethod
    def of(cls, session: Session, now_ms: int) -> SessionView:
        return cls(
            id=session.id,
            created_at=session.created_at_ms // 1000,
            expires_at=(now_ms + session.expires_in_ms) // 1000,
            messages=list(session.messages),
            usage=SessionUsage(
                prompt_tokens=session.prompt_tokens,
                completion_tokens=session.completion_tokens,
                total_tokens=session.prompt_tokens + session.completion_tokens,
            ),
            cost_usd=session.cost_usd,
            request_count=session.requests,
        )


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such session (or another client's)"}
}

routes = Routes(tags=["sessions"])


@routes.post(
    "/v1/sessions", status_code=201, response_model=SessionCreated, responses=ERROR_RESPONSES
)
async def create_session(identity: CallerDep, sessions: SessionsDep) -> SessionCreated:
    """Create an empty session belonging to the caller.

    A session also comes into being with the first request that names a new ``session_id``;
    it then belongs to that request's client.
    """
    try:
        session = await sessions.create(identity.client_id)
    except RedisError:
        raise unavailable("Redis") from None
    return SessionCreated(id=session.id, created_at=session.created_at_ms // 1000)


@routes.get(
    "/v1/sessions/{session_id:path}",
    response_model=SessionView,
    response_model_exclude_none=True,
    responses={**_NOT_FOUND, **ERROR_RESPONSES},
)
async def get_session(
    session_id: SessionIdPath, identity: CallerDep, sessions: SessionsDep
) -> SessionView:
    """The session's history, token totals, cost and request count."""
    try:
        session = await sessions.get(session_id)
    except RedisError:
        raise unavailable("Redis") from None
    if session is None or not _may_see(identity, session):
        raise _not_found()
    return SessionView.of(session, wall_clock_ms())


@routes.delete(
    "/v1/sessions/{session_id:path}",
    response_model=SessionDeleted,
    responses={**_NOT_FOUND, **ERROR_RESPONSES},
)
async def delete_session(
    session_id: SessionIdPath, identity: CallerDep, sessions: SessionsDep
) -> SessionDeleted:
    """Delete the session and its history. A request naming it later starts a new one."""
    try:
        deleted = await sessions.delete(session_id, identity.client_id)
    except RedisError:
        raise unavailable("Redis") from None
    if not deleted:
        raise _not_found()
    return SessionDeleted(id=session_id)


def _may_see(identity: Identity, session: Session) -> bool:
    """As :meth:`Identity.may_see` for requests: with keys on, only the owner's; a session of
    nobody is nobody's to see."""
    return identity.client_id is None or session.owner == identity.client_id


def _not_found() -> ApiError:
    return ApiError(404, "no session with this ID", param="session_id", code="not_found")
