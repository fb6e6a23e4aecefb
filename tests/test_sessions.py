"""The session store, each test against a single Redis and a three-node Redis Cluster: owners,
history, totals, idempotent appends, the caps' rule (oldest whole turns dropped, the opening
system messages kept, an oversized turn refused) and the TTL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from llmstream.core.record import AnyRedis, slot
from llmstream.core.sessions import (
    APPLIED_IDS_KEPT,
    SessionOwnerMismatch,
    SessionParams,
    SessionStore,
    SessionTurnTooLarge,
)
from llmstream.schemas.models import ChatMessage
from tests.redis_cluster import any_redis, redis_cluster

__all__ = ["any_redis", "redis_cluster"]  # fixtures: each test runs on both Redis kinds

pytestmark = pytest.mark.integration


def msg(role: str, content: str | None = None, **extra: Any) -> ChatMessage:
    return ChatMessage.model_validate({"role": role, "content": content, **extra})


def user(text: str) -> ChatMessage:
    return msg("user", text)


def answer(text: str) -> ChatMessage:
    return msg("assistant", text)


def texts(messages: tuple[ChatMessage, ...] | list[ChatMessage]) -> list[str | None]:
    return [m.content for m in messages]


def store_of(redis: AnyRedis, unique: str, **params: Any) -> SessionStore:
    return SessionStore(redis, key_prefix=f"sess-{unique}:", params=SessionParams(**params))


@pytest.fixture
def store(any_redis: AnyRedis, unique: str) -> SessionStore:
    return store_of(any_redis, unique)


async def test_one_sessions_keys_share_a_slot_and_sessions_spread(
    any_redis: AnyRedis, store: SessionStore
) -> None:
    assert len({slot(key) for key in store.keys.all("s1")}) == 1
    assert len({slot(store.keys.meta(f"s{i}")) for i in range(10)}) == 10
    if isinstance(any_redis, RedisCluster):
        owners = {any_redis.get_node_from_key(store.keys.meta(f"s{i}")).port for i in range(10)}
        assert len(owners) == 3


async def test_a_created_session_is_empty_and_its_owners(store: SessionStore) -> None:
    created = await store.create("alice")
    found = await store.get(created.id)
    assert found is not None
    assert (found.id, found.owner, found.created_at_ms) == (
        created.id,
        "alice",
        created.created_at_ms,
    )
    assert (found.messages, found.requests, found.prompt_tokens, found.cost_usd) == ((), 0, 0, 0.0)
    assert 0 < found.expires_in_ms <= 7 * 24 * 3600 * 1000
    anonymous = await store.create(None)
    assert (await store.get(anonymous.id)) is not None
    assert (await store.get(anonymous.id)).owner is None  # type: ignore[union-attr]
    assert await store.get("sess_nobody") is None
    assert await store.history("sess_nobody", "alice") == []


async def test_appends_build_the_history_and_the_totals(store: SessionStore) -> None:
    session = await store.create("alice")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
    first = await store.append(
        session.id,
        "r1",
        [msg("system", "be brief"), user("one")],
        answer("answer one"),
        owner="alice",
        prompt_tokens=10,
        completion_tokens=3,
        cost_usd=0.001,
        tool_messages=[
            msg("assistant", None, tool_calls=[call]),
            msg("tool", '{"y": 2}', tool_call_id="call_1"),
        ],
    )
    second = await store.append(
        session.id,
        "r2",
        [user("two")],
        answer("answer two"),
        owner="alice",
        prompt_tokens=20,
        completion_tokens=4,
        cost_usd=0.002,
    )
    assert (first.duplicate, first.created, second.duplicate) == (False, False, False)
    history = await store.history(session.id, "alice")
    assert [m.role for m in history] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert texts(history) == [
        "be brief",
        "one",
        None,
        '{"y": 2}',
        "answer one",
        "two",
        "answer two",
    ]
    assert history[2].tool_calls is not None and history[2].tool_calls[0].id == "call_1"
    assert history[2].tool_calls[0].function.arguments == '{"x":1}'
    assert history[3].tool_call_id == "call_1"
    found = await store.get(session.id)
    assert found is not None
    assert (found.prompt_tokens, found.completion_tokens, found.requests) == (30, 7, 2)
    assert found.cost_usd == pytest.approx(0.003)


async def test_an_append_is_applied_once_per_request_id(store: SessionStore) -> None:
    session = await store.create("alice")
    args = ([user("one")], answer("answer one"))
    first = await store.append(session.id, "r1", *args, owner="alice", prompt_tokens=5)
    # A worker that crashed after appending answers the request again, perhaps differently.
    again = await store.append(
        session.id, "r1", [user("one")], answer("another answer"), owner="alice", prompt_tokens=5
    )
    racing = await asyncio.gather(
        *(
            store.append(session.id, "r2", [user("two")], answer("a2"), owner="alice")
            for _ in range(8)
        )
    )
    assert not first.duplicate and again.duplicate
    assert sorted(r.duplicate for r in racing) == [False] + [True] * 7
    found = await store.get(session.id)
    assert found is not None
    assert texts(found.messages) == ["one", "answer one", "two", "a2"]
    assert (found.requests, found.prompt_tokens) == (2, 5)


async def test_concurrent_appends_of_one_session_are_each_whole(store: SessionStore) -> None:
    results = await asyncio.gather(
        *(
            store.append("s-busy", f"r{i}", [user(f"q{i}")], answer(f"a{i}"), owner="bob")
            for i in range(40)
        )
    )
    assert sum(r.created for r in results) == 1
    found = await store.get("s-busy")
    assert found is not None and found.requests == 40 and found.owner == "bob"
    pairs = list(zip(texts(found.messages)[::2], texts(found.messages)[1::2], strict=True))
    assert sorted(pairs) == sorted((f"q{i}", f"a{i}") for i in range(40))


async def test_the_first_append_creates_the_session_for_its_requests_client(
    store: SessionStore,
) -> None:
    created = await store.append("s-new", "r1", [user("hi")], answer("hello"), owner="carol")
    assert created.created and not created.duplicate
    found = await store.get("s-new")
    assert found is not None and found.owner == "carol" and found.requests == 1
    nobodys = await store.append("s-anon", "r1", [user("hi")], answer("hello"), owner=None)
    assert nobodys.created
    assert texts(await store.history("s-anon", None)) == ["hi", "hello"]


async def test_another_clients_append_and_history_are_refused(store: SessionStore) -> None:
    session = await store.create("alice")
    await store.append(session.id, "r1", [user("secret")], answer("noted"), owner="alice")
    anonymous = await store.create(None)
    for owner in ("mallory", None):
        with pytest.raises(SessionOwnerMismatch):
            await store.append(session.id, f"r-{owner}", [user("x")], answer("y"), owner=owner)
        with pytest.raises(SessionOwnerMismatch):
            await store.history(session.id, owner)
    # A session of nobody takes no client's request either.
    with pytest.raises(SessionOwnerMismatch):
        await store.append(anonymous.id, "r2", [user("x")], answer("y"), owner="alice")
    found = await store.get(session.id)
    assert found is not None and texts(found.messages) == ["secret", "noted"]
    assert found.requests == 1


async def test_over_the_message_cap_the_oldest_whole_turns_go_and_the_opening_system_stays(
    any_redis: AnyRedis, unique: str
) -> None:
    store = store_of(any_redis, unique, session_max_messages=6)
    first = await store.append(
        "s", "r1", [msg("system", "rules"), user("q1")], answer("a1"), owner="a"
    )
    second = await store.append("s", "r2", [user("q2")], answer("a2"), owner="a")
    # A system message later on belongs to its turn: it goes with it.
    third = await store.append(
        "s", "r3", [msg("system", "now shorter"), user("q3")], answer("a3"), owner="a"
    )
    assert (first.dropped_turns, second.dropped_turns, third.dropped_turns) == (0, 0, 1)
    assert texts(await store.history("s", "a")) == ["rules", "q2", "a2", "now shorter", "q3", "a3"]
    fourth = await store.append("s", "r4", [user("q4")], answer("a4"), owner="a")
    assert fourth.dropped_turns == 1
    assert texts(await store.history("s", "a")) == ["rules", "now shorter", "q3", "a3", "q4", "a4"]
    # Two turns go to make room for one of four messages.
    fifth = await store.append(
        "s", "r5", [user("q5"), answer("draft"), user("q5 again")], answer("a5"), owner="a"
    )
    assert fifth.dropped_turns == 2
    assert texts(await store.history("s", "a")) == ["rules", "q5", "draft", "q5 again", "a5"]
    found = await store.get("s")
    assert found is not None and found.requests == 5  # dropped turns still counted


async def test_over_the_byte_cap_the_oldest_turns_go(any_redis: AnyRedis, unique: str) -> None:
    store = store_of(any_redis, unique, session_max_bytes=4096)
    for i in range(6):
        await store.append("s", f"r{i}", [user(f"{i}" * 900)], answer(f"a{i}"), owner="a")
    history = await store.history("s", "a")
    kept = [m.content for m in history if m.role == "user"]
    assert kept == [f"{i}" * 900 for i in range(2, 6)]  # four turns of ~950 bytes fit in 4 KiB
    assert [m.content for m in history if m.role == "assistant"] == ["a2", "a3", "a4", "a5"]


async def test_a_turn_too_large_alone_is_refused_and_changes_nothing(
    any_redis: AnyRedis, unique: str
) -> None:
    store = store_of(any_redis, unique, session_max_messages=4, session_max_bytes=2048)
    await store.append("s", "r1", [msg("system", "rules"), user("q1")], answer("a1"), owner="a")
    before = await store.get("s")
    with pytest.raises(SessionTurnTooLarge, match="LLMSTREAM_SESSION_MAX_BYTES"):
        await store.append("s", "r2", [user("x" * 3000)], answer("a2"), owner="a")
    # With the opening system message, four messages leave room for three, not four.
    with pytest.raises(SessionTurnTooLarge, match=r"\(5 messages"):
        await store.append("s", "r3", [user("q"), answer("d"), user("q")], answer("a"), owner="a")
    after = await store.get("s")
    assert before is not None and after is not None
    assert replace(after, expires_in_ms=0) == replace(before, expires_in_ms=0)
    # The worker can tell before it calls the provider.
    with pytest.raises(SessionTurnTooLarge):
        store.check_new_messages([user("x" * 3000)])
    store.check_new_messages([user("fits")])
    # Refused, not forgotten: the same request fits once it is smaller, under its own ID.
    assert not (await store.append("s", "r2", [user("short")], answer("a2"), owner="a")).duplicate


async def test_each_append_renews_the_ttl(any_redis: AnyRedis, unique: str) -> None:
    store = store_of(any_redis, unique, session_ttl_s=3600)
    await store.append("s", "r1", [user("q1")], answer("a1"), owner="a")
    for key in store.keys.all("s"):
        assert 0 < await any_redis.pttl(key) <= 3_600_000
        await any_redis.expire(key, 30)
    await store.append("s", "r2", [user("q2")], answer("a2"), owner="a")
    for key in store.keys.all("s"):
        assert await any_redis.pttl(key) > 60_000


async def test_the_remembered_request_ids_are_bounded(any_redis: AnyRedis, unique: str) -> None:
    store = store_of(any_redis, unique, session_max_messages=10)
    count = APPLIED_IDS_KEPT + 5
    for start in range(0, count, 100):
        await asyncio.gather(
            *(
                store.append("s", f"r{i}", [user("q")], answer("a"), owner="a")
                for i in range(start, min(start + 100, count))
            )
        )
    assert await any_redis.zcard(store.keys.applied("s")) == APPLIED_IDS_KEPT
    latest = await store.append("s", f"r{count - 1}", [user("q")], answer("a"), owner="a")
    assert latest.duplicate


async def test_delete_only_the_owners_session(any_redis: AnyRedis, store: SessionStore) -> None:
    session = await store.create("alice")
    await store.append(session.id, "r1", [user("q")], answer("a"), owner="alice")
    assert not await store.delete(session.id, "mallory")
    assert await store.get(session.id) is not None
    assert await store.delete(session.id, "alice")
    assert await store.get(session.id) is None
    assert not await any_redis.exists(*store.keys.all(session.id))
    assert not await store.delete(session.id, "alice")
    # With authentication off (no caller identity), any session may be deleted.
    other = await store.create("bob")
    assert await store.delete(other.id, None)
