"""Sessions: conversations kept in Redis, so a request carries only its new messages.

A request with ``session_id`` is answered with the session's stored history in front of its own
messages; once answered, its new messages and the answer are appended, as one turn. The worker
calls :meth:`SessionStore.history` and :meth:`SessionStore.append`; the ingress creates, shows and
deletes sessions (``/v1/sessions``). This module owns every session key, field and script.

Keys (the session ID is the Redis Cluster hash tag: one session's keys share a slot, so every
script here runs on Redis Cluster as on a single Redis)::

    {prefix}session:{<id>}          a hash: owner, created_at_ms, head, head_count, messages,
                                    bytes, prompt_tokens, completion_tokens, cost_usd, requests
    {prefix}session-turns:{<id>}    a list, oldest first, one element per turn:
                                    "<message count> <JSON array of the turn's messages>"
    {prefix}session-applied:{<id>}  a sorted set: the request IDs appended, scored by order

Messages are stored in OpenAI's shape (assistant ``tool_calls``, ``tool`` messages with
``tool_call_id``), as :class:`~llmstream.schemas.models.ChatMessage` writes them.

Owner. A session belongs to the client that created it (``POST /v1/sessions``), or to the
client of the request whose append created it; none when authentication is off. An append, and
:meth:`SessionStore.history`, by any other client is refused (:class:`SessionOwnerMismatch`):
owners are compared as they are, so a session of nobody takes no client's requests, and a
client's session takes no request without its client.

Appends are atomic (one script) and idempotent per request ID: a worker that appended and then
crashed before its outcome was stored may answer the same request again, and its second append
changes nothing. The last :data:`APPLIED_IDS_KEPT` request IDs of a session are remembered.

Caps (``LLMSTREAM_SESSION_MAX_MESSAGES``, ``LLMSTREAM_SESSION_MAX_BYTES``, counted over the
stored JSON). A turn is one request's new messages, the assistant and tool messages of its tool
loop, and its answer. The system messages that open a session (the leading system messages of
its first turn) are its *head*: they are always kept. When an append would go over a cap, whole
turns are dropped, oldest first, until the new turn fits; a turn is never cut. A turn that does
not fit even alone beside the head is refused (:class:`SessionTurnTooLarge`) and nothing is
changed.

TTL (``LLMSTREAM_SESSION_TTL_S``): from the session's creation, and again from each append.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ConfigDict, Field

from llmstream.core.clock import wall_clock_ms
from llmstream.core.errors import LLMStreamError
from llmstream.core.record import AnyRedis
from llmstream.schemas.models import MAX_MESSAGES, ChatMessage

__all__ = [
    "APPLIED_IDS_KEPT",
    "Appended",
    "Session",
    "SessionError",
    "SessionKeys",
    "SessionOwnerMismatch",
    "SessionParams",
    "SessionStore",
    "SessionTurnTooLarge",
]

# Request IDs remembered per session for idempotent appends. A request is appended again only
# when its worker died between the append and storing the outcome, so its redelivery comes
# within a few requests of the session; this many is far more than enough.
APPLIED_IDS_KEPT = 1000


class SessionParams(BaseModel):
    """Session TTL and caps; a deployable's settings derive from this class (the fields are read
    as ``LLMSTREAM_SESSION_TTL_S``, ``LLMSTREAM_SESSION_MAX_MESSAGES``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # The history goes to the provider in front of a request's own messages, inside one request
    # of at most MAX_MESSAGES messages.
    session_max_messages: int = Field(200, ge=2, le=MAX_MESSAGES)
    session_max_bytes: int = Field(1024 * 1024, ge=1024)


class SessionError(LLMStreamError):
    """A session cannot take what it was given."""


class SessionOwnerMismatch(SessionError):
    """The session belongs to another client (or to none, or the caller is none)."""


class SessionTurnTooLarge(SessionError):
    """One turn is over the session's cap on its own: it is refused, never cut."""

    def __init__(self, messages: int, size: int, *, max_messages: int, max_bytes: int) -> None:
        super().__init__(
            f"the turn ({messages} messages, {size:,} bytes with the session's opening system "
            f"messages) is larger than a session holds: at most {max_messages} messages "
            f"(LLMSTREAM_SESSION_MAX_MESSAGES) and {max_bytes:,} bytes "
            "(LLMSTREAM_SESSION_MAX_BYTES)"
        )
        self.messages = messages
        self.size = size


@dataclass(frozen=True, slots=True)
class Session:
    """A session as stored."""

    id: str
    owner: str | None  # the client it belongs to; None when it was created without one
    created_at_ms: int
    messages: tuple[ChatMessage, ...]  # the history: head, then the turns kept, oldest first
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float  # of the requests whose cost was known
    requests: int  # requests appended, dropped turns included
    expires_in_ms: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What :meth:`SessionStore.append` did."""

    duplicate: bool  # the request was appended before: nothing changed
    created: bool = False  # the session did not exist: this append created it
    dropped_turns: int = 0  # oldest turns dropped to make room


class SessionKeys:
    """The key names of one session under a key prefix (see the module's doc)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def meta(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}"

    def turns(self, session_id: str) -> str:
        return f"{self.prefix}session-turns:{{{session_id}}}"

    def applied(self, session_id: str) -> str:
        return f"{self.prefix}session-applied:{{{session_id}}}"

    def all(self, session_id: str) -> list[str]:
        return [self.meta(session_id), self.turns(session_id), self.applied(session_id)]


# KEYS: meta, turns, applied. ARGV: owner ('' for none), now_ms, ttl_s.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at_ms', ARGV[2], 'requests', 0)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: meta, turns, applied. Reply: false when there is no session, else {owner, created_at_ms,
# prompt_tokens, completion_tokens, cost_usd, requests, pttl, head, turn, turn, ...}.
_READ = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'created_at_ms', 'prompt_tokens',
                     'completion_tokens', 'cost_usd', 'requests', 'head')
if not h[2] then return false end
local reply = {h[1] or '', h[2], h[3] or '0', h[4] or '0', h[5] or '0', h[6] or '0',
               redis.call('PTTL', KEYS[1]), h[7] or ''}
for _, turn in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do reply[#reply + 1] = turn end
return reply
"""

# KEYS: meta, turns, applied. ARGV: owner ('' for none), or '*' for any. Reply: 1 deleted,
# 0 no session, -1 another owner's.
_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
if ARGV[1] ~= '*' and owner ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: meta, turns, applied. ARGV: request_id, owner ('' for none), now_ms, ttl_s,
# max_messages, max_bytes, lead (JSON array of the turn's leading system messages, '' for none),
# lead_count, rest (JSON array of the turn's other messages, never empty), rest_count,
# prompt_tokens, completion_tokens, cost_usd ('' when unknown), applied IDs kept.
# Reply: {'appended', created (0/1), turns dropped} | {'duplicate'} | {'owner'}
#        | {'too_large', messages, bytes}
_APPEND = """
local meta, turns, applied = KEYS[1], KEYS[2], KEYS[3]
local rid, owner, now, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_n, max_b = tonumber(ARGV[5]), tonumber(ARGV[6])
local lead, lead_n, rest, rest_n = ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])

local h = redis.call('HMGET', meta, 'owner', 'created_at_ms', 'requests', 'head_count', 'head',
                     'messages', 'bytes')
local created = 0
if h[2] then
  if (h[1] or '') ~= owner then return {'owner'} end
  if redis.call('ZSCORE', applied, rid) then return {'duplicate'} end
else
  created = 1
end
local head_n, head_b = tonumber(h[4] or '0'), string.len(h[5] or '')
local n, b = tonumber(h[6] or '0'), tonumber(h[7] or '0')

-- The leading system messages of a session's first turn open it for good (its head); in any
-- later turn they are part of the turn.
local turn, turn_n, new_head = rest, rest_n, nil
if tonumber(h[3] or '0') == 0 and lead ~= '' then
  new_head, head_n, head_b = lead, lead_n, string.len(lead)
  n, b = n + head_n, b + head_b
elseif lead ~= '' then
  turn = string.sub(lead, 1, -2) .. ',' .. string.sub(rest, 2)
  turn_n = lead_n + rest_n
end
local element = turn_n .. ' ' .. turn

if head_n + turn_n > max_n or head_b + string.len(element) > max_b then
  return {'too_large', head_n + turn_n, head_b + string.len(element)}
end

local dropped = 0
while n + turn_n > max_n or b + string.len(element) > max_b do
  local old = redis.call('LPOP', turns)
  if not old then break end
  n = n - tonumber(string.match(old, '^%d+'))
  b = b - string.len(old)
  dropped = dropped + 1
end
redis.call('RPUSH', turns, element)
n, b = n + turn_n, b + string.len(element)

if created == 1 then redis.call('HSET', meta, 'owner', owner, 'created_at_ms', now) end
if new_head then redis.call('HSET', meta, 'head', new_head, 'head_count', head_n) end
redis.call('HSET', meta, 'messages', n, 'bytes', b, 'updated_at_ms', now)
redis.call('HINCRBY', meta, 'prompt_tokens', ARGV[11])
redis.call('HINCRBY', meta, 'completion_tokens', ARGV[12])
if ARGV[13] ~= '' then redis.call('HINCRBYFLOAT', meta, 'cost_usd', ARGV[13]) end
local order = redis.call('HINCRBY', meta, 'requests', 1)
redis.call('ZADD', applied, order, rid)
redis.call('ZREMRANGEBYRANK', applied, 0, -(tonumber(ARGV[14]) + 1))
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', turns, ttl)
redis.call('EXPIRE', applied, ttl)
return {'appended', created, dropped}
"""


class SessionStore:
    """Sessions under one key prefix, on a single Redis or on Redis Cluster."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        params: SessionParams,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.redis = redis
        self.keys = SessionKeys(key_prefix)
        self.params = params
        self._clock_ms = clock_ms
        self._create = redis.register_script(_CREATE)
        self._read = redis.register_script(_READ)
        self._delete = redis.register_script(_DELETE)
        self._append = redis.register_script(_APPEND)

    async def create(self, owner: str | None) -> Session:
        """A new, empty session belonging to ``owner``."""
        now = self._clock_ms()
        while True:  # a random ID: taken only in theory
            session_id = f"sess_{uuid.uuid4().hex}"
            made = await self._create(
                keys=self.keys.all(session_id), args=[owner or "", now, self.params.session_ttl_s]
            )
            if int(made):
                break
        return Session(session_id, owner, now, (), 0, 0, 0.0, 0, self.params.session_ttl_s * 1000)

    async def owner(self, session_id: str) -> tuple[bool, str | None]:
        """Whether the session exists, and its owner: one field read, not the history."""
        created, owner = await self.redis.hmget(
            self.keys.meta(session_id), "created_at_ms", "owner"
        )
        return created is not None, (_text(owner) or None) if owner is not None else None

    async def get(self, session_id: str) -> Session | None:
        """The session, or None when there is none (never created, expired or deleted)."""
        reply = await self._read(keys=self.keys.all(session_id))
        if not reply:
            return None
        owner, created, prompt, completion, cost, requests, pttl, head, *turns = (
            _text(x) for x in reply
        )
        messages = _messages(head) if head else []
        for turn in turns:
            messages.extend(_messages(turn.partition(" ")[2]))
        return Session(
            id=session_id,
            owner=owner or None,
            created_at_ms=int(created),
            messages=tuple(messages),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            cost_usd=float(cost),
            requests=int(requests),
            expires_in_ms=max(int(pttl), 0),
        )

    async def history(self, session_id: str, owner: str | None) -> list[ChatMessage]:
        """The messages to put in front of a request of ``owner`` in this session: none when
        the session does not exist yet. Raises SessionOwnerMismatch for another's session."""
        session = await self.get(session_id)
        if session is None:
            return []
        if session.owner != owner:
            raise SessionOwnerMismatch(f"session {session_id} belongs to another client")
        return list(session.messages)

    async def delete(self, session_id: str, owner: str | None) -> bool:
        """Delete the session if it is ``owner``'s; True when it was deleted.

        ``owner`` None is a caller with authentication off, who may touch every session (as
        :meth:`~llmstream.ingress.auth.Identity.may_see` shows every request). False for a
        session that does not exist and for another client's, alike.
        """
        deleted = await self._delete(
            keys=self.keys.all(session_id), args=["*" if owner is None else owner]
        )
        return int(deleted) == 1

    def check_new_messages(self, new_messages: Sequence[ChatMessage]) -> None:
        """Raise SessionTurnTooLarge when a request's new messages could not be appended even
        before its answer is added, so the worker can refuse before paying for a call."""
        lead, rest = _split_lead(new_messages)
        size = len(_json(lead)) + len(_json(rest))
        if len(new_messages) + 1 > self.params.session_max_messages or (
            size > self.params.session_max_bytes
        ):
            raise self._too_large(len(new_messages) + 1, size)

    async def append(
        self,
        session_id: str,
        request_id: str,
        new_messages: Sequence[ChatMessage],
        answer_message: ChatMessage,
        *,
        owner: str | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float | None = None,
        tool_messages: Sequence[ChatMessage] = (),
    ) -> Appended:
        """Append one request's turn: its ``new_messages``, the ``tool_messages`` of its tool
        loop (assistant tool calls and tool results, in order), then ``answer_message``; and add
        its usage and cost to the session's totals.

        Creates the session, owned by ``owner``, when it does not exist. Atomic; a request ID
        appended before changes nothing (``duplicate``). Drops the oldest turns to stay within
        the caps (see the module's doc). Raises SessionOwnerMismatch when the session is another
        client's and SessionTurnTooLarge when the turn cannot fit even alone.
        """
        lead, rest = _split_lead(new_messages)
        rest = [*rest, *tool_messages, answer_message]
        reply = await self._append(
            keys=self.keys.all(session_id),
            args=[
                request_id,
                owner or "",
                self._clock_ms(),
                self.params.session_ttl_s,
                self.params.session_max_messages,
                self.params.session_max_bytes,
                _json(lead) if lead else "",
                len(lead),
                _json(rest),
                len(rest),
                prompt_tokens,
                completion_tokens,
                repr(float(cost_usd)) if cost_usd is not None and math.isfinite(cost_usd) else "",
                APPLIED_IDS_KEPT,
            ],
        )
        answer = _text(reply[0])
        if answer == "appended":
            return Appended(False, created=int(reply[1]) == 1, dropped_turns=int(reply[2]))
        if answer == "duplicate":
            return Appended(True)
        if answer == "owner":
            raise SessionOwnerMismatch(f"session {session_id} belongs to another client")
        raise self._too_large(int(reply[1]), int(reply[2]))

    def _too_large(self, messages: int, size: int) -> SessionTurnTooLarge:
        return SessionTurnTooLarge(
            messages,
            size,
            max_messages=self.params.session_max_messages,
            max_bytes=self.params.session_max_bytes,
        )


def _split_lead(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[ChatMessage]]:
    """The leading system messages, and the others."""
    count = 0
    while count < len(messages) and messages[count].role == "system":
        count += 1
    return list(messages[:count]), list(messages[count:])


def _json(messages: Sequence[ChatMessage]) -> str:
    return orjson.dumps([m.model_dump(mode="json", exclude_none=True) for m in messages]).decode()


def _messages(text: str) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in orjson.loads(text)]


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
