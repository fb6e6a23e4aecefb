"""The provider simulator's batch APIs (OpenAI Files + Batches, Anthropic Message Batches) and
OpenAI's flex tier, spoken to over loopback HTTP with the official SDKs and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import pytest_asyncio
from pydantic import SecretStr

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings

T = TypeVar("T")
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
OPENAI_ENDED = ("completed", "failed", "expired", "cancelled")


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, seed=7, batch_delay_ms=50)
    async with SimulatorServer(settings) as server:
        yield server


@pytest_asyncio.fixture
async def http(sim: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=60) as client:
        await client.post("/_sim/reset")
        yield client
        await client.post("/_sim/reset")


@pytest_asyncio.fixture
async def oai(sim: SimulatorServer, http: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="k", max_retries=0) as client:
        yield client


@pytest_asyncio.fixture
async def claude(
    sim: SimulatorServer, http: httpx.AsyncClient
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as client:
        yield client


def uid(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def chat_body(text: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def claude_params(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode() + b"\n"


def openai_lines(bodies: dict[str, dict[str, Any]]) -> bytes:
    return jsonl(
        [
            {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
            for cid, body in bodies.items()
        ]
    )


async def until(fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Poll until ``done``; the test's timeout bounds the wait."""
    while not done(value := await fetch()):
        await asyncio.sleep(0.02)
    return value


async def openai_batch(
    oai: openai.AsyncOpenAI, content: bytes
) -> tuple[openai.types.Batch, openai.types.Batch]:
    """Upload ``content``, create a batch of it; (the batch as created, the batch once ended)."""
    file = await oai.files.create(file=("requests.jsonl", content), purpose="batch")
    created = await oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    ended = await until(
        lambda: oai.batches.retrieve(created.id), lambda b: b.status in OPENAI_ENDED
    )
    return created, ended


async def file_rows(oai: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    content = await oai.files.content(file_id)
    rows = [json.loads(line) for line in content.text.splitlines()]
    return {row["custom_id"]: row for row in rows}


def same_answer(batch_body: dict[str, Any], sync_body: dict[str, Any]) -> None:
    """Two chat completions say the same thing (their IDs and clocks differ)."""
    for answer in (batch_body, sync_body):
        answer.pop("id")
        answer.pop("created")
    assert batch_body == sync_body


# --- OpenAI Files and Batches ------------------------------------------------------------------


async def test_openai_batch_through_the_sdk_answers_as_synchronous_calls_do(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    bodies = {uid(): chat_body(f"question number {i}") for i in range(3)}
    bodies[uid()] = chat_body("be short", max_tokens=1)

    created, batch = await openai_batch(oai, openai_lines(bodies))

    assert (created.status, created.object) == ("validating", "batch")
    assert created.request_counts is not None and created.request_counts.total == 0
    assert batch.status == "completed"
    assert (batch.endpoint, batch.completion_window, batch.model) == (
        "/v1/chat/completions",
        "24h",
        "gpt-4o-mini",
    )
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    assert batch.error_file_id is None and batch.errors is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600
    output = await file_rows(oai, batch.output_file_id)
    assert set(output) == set(bodies)
    for cid, body in bodies.items():
        row = output[cid]
        assert row["id"].startswith("batch_req_") and row["error"] is None
        assert row["response"]["status_code"] == 200 and row["response"]["request_id"]
        sync = await http.post("/v1/chat/completions", json=body)
        same_answer(row["response"]["body"], sync.json())
    usage = batch.usage
    assert usage is not None
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens > 0
    output_file = await oai.files.retrieve(batch.output_file_id or "")
    assert (output_file.purpose, output_file.filename) == (
        "batch_output",
        f"{batch.id}_output.jsonl",
    )

    stats = (await http.get("/_sim/stats")).json()
    assert stats["batches_by_request_id"] == {cid: [batch.id] for cid in bodies}
    assert stats["batch_lines_by_outcome"] == {"succeeded": 4}
    # The four synchronous calls above are the only calls; the batch made none.
    assert stats["calls_total"] == 4 and "" in stats["calls_by_request_id"]
    assert not set(stats["calls_by_request_id"]) & set(bodies)


async def test_openai_line_errors_go_to_the_error_file(oai: openai.AsyncOpenAI) -> None:
    ok, retryable, invalid, malformed = uid(), uid(), uid(), uid()
    bodies = {
        ok: chat_body("fine"),
        retryable: chat_body("please fail [batch-error:500]"),
        invalid: chat_body("refuse me [batch-error:400]"),
        malformed: {"model": "gpt-4o-mini", "messages": []},
    }

    _, batch = await openai_batch(oai, openai_lines(bodies))

    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert set(await file_rows(oai, batch.output_file_id)) == {ok}
    errors = await file_rows(oai, batch.error_file_id)
    assert set(errors) == {retryable, invalid, malformed}
    statuses = {cid: row["response"]["status_code"] for cid, row in errors.items()}
    assert statuses == {retryable: 500, invalid: 400, malformed: 400}
    kinds = {cid: row["response"]["body"]["error"]["type"] for cid, row in errors.items()}
    assert kinds == {
        retryable: "server_error",
        invalid: "invalid_request_error",
        malformed: "invalid_request_error",
    }
    assert all(row["error"] is None for row in errors.values())


async def test_a_marker_with_a_count_acts_on_the_first_batches_only(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    cid = uid()
    content = openai_lines({cid: chat_body("flaky once [batch-error:503:1]")})

    _, first = await openai_batch(oai, content)
    _, second = await openai_batch(oai, content)

    first_errors = await file_rows(oai, first.error_file_id)
    assert first_errors[cid]["response"]["status_code"] == 503
    assert (first.output_file_id, second.error_file_id) == (None, None)
    answer = (await file_rows(oai, second.output_file_id))[cid]["response"]["body"]
    assert answer["choices"][0]["message"]["content"] == "echo: flaky once [batch-error:503:1]"
    stats = (await http.get("/_sim/stats")).json()
    assert stats["batches_by_request_id"][cid] == [first.id, second.id]


def line(custom_id: str, url: str = "/v1/chat/completions", **body: Any) -> str:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    row = {"custom_id": custom_id, "method": "POST", "url": url, "body": request}
    row["body"] = {key: value for key, value in request.items() if value is not None}
    return json.dumps(row)


@pytest.mark.parametrize(
    ("lines", "code", "number"),
    [
        pytest.param([line("a"), line("a")], "duplicate_custom_id", 2, id="duplicate-custom-id"),
        pytest.param([line("a"), line("b", model="gpt-4o")], "mismatched_model", 2, id="2-models"),
        pytest.param([line("a"), line("b", "/v1/embeddings")], "invalid_url", 2, id="endpoint"),
        pytest.param([line("a"), "{not json"], "invalid_json_line", 2, id="not-json"),
        pytest.param([line("a", model=None)], "missing_required_parameter", 1, id="no-model"),
    ],
)
async def test_an_input_file_that_breaks_the_rules_fails_the_batch(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient, lines: list[str], code: str, number: int
) -> None:
    _, batch = await openai_batch(oai, "\n".join(lines).encode())

    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data
    assert [(e.code, e.line) for e in batch.errors.data] == [(code, number)]
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert (await http.get("/_sim/stats")).json()["batches_by_request_id"] == {}


async def test_a_file_of_more_than_50000_requests_fails_the_batch(
    oai: openai.AsyncOpenAI,
) -> None:
    line = '{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}'
    content = "\n".join(line % i for i in range(50_001)).encode()

    _, batch = await openai_batch(oai, content)

    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert [e.code for e in batch.errors.data] == ["too_many_requests_in_file"]


async def test_files_and_batch_creation_refuse_what_the_api_refuses(
    oai: openai.AsyncOpenAI,
) -> None:
    content = openai_lines({uid(): chat_body("hi")})
    with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
        await oai.files.create(file=("requests.txt", content), purpose="batch")
    notes = await oai.files.create(file=("notes.jsonl", content), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        await oai.batches.create(
            input_file_id=notes.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError, match="No such File object"):
        await oai.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    batch_file = await oai.files.create(file=("requests.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await oai.batches.create(
            input_file_id=batch_file.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",
        )
    with pytest.raises(openai.NotFoundError):
        await oai.batches.retrieve("batch_missing")

    assert (batch_file.bytes, batch_file.purpose) == (len(content), "batch")
    assert (await oai.files.content(batch_file.id)).content == content
    assert (await oai.files.delete(batch_file.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await oai.files.retrieve(batch_file.id)


async def test_openai_batches_are_listed_newest_first_a_page_at_a_time(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    file = await oai.files.create(
        file=("r.jsonl", openai_lines({uid(): chat_body("hi")})), purpose="batch"
    )
    created = [
        await oai.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"submission": f"s{i}"},
        )
        for i in range(5)
    ]
    await claude.messages.batches.create(
        requests=[{"custom_id": uid(), "params": claude_params("hi")}]
    )
    newest_first = [batch.id for batch in reversed(created)]

    first = await oai.batches.list(limit=2)
    listed = [batch async for batch in oai.batches.list(limit=2)]  # page after page
    last = await oai.batches.list(after=newest_first[3], limit=2)
    after_all = await oai.batches.list(after=newest_first[4])

    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    assert first.model_extra == {
        "object": "list",
        "first_id": newest_first[0],
        "last_id": newest_first[1],
    }
    assert [b.id for b in listed] == newest_first
    assert [(b.metadata or {}).get("submission") for b in listed] == ["s4", "s3", "s2", "s1", "s0"]
    assert [b.id for b in last.data] == newest_first[4:] and not last.has_more
    assert (after_all.data, after_all.has_more) == ([], False)
    assert [b.id for b in (await oai.batches.list()).data] == newest_first  # 20 by default
    for limit in (0, 101):
        with pytest.raises(openai.BadRequestError, match="Invalid 'limit'"):
            await oai.batches.list(limit=limit)


async def test_a_cancelled_openai_batch_answers_nothing(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    await http.post("/_sim/config", json={"batch_delay_ms": 600_000})
    cids = [uid(), uid()]
    file = await oai.files.create(
        file=("r.jsonl", openai_lines({c: chat_body("hi") for c in cids})), purpose="batch"
    )
    created = await oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await until(lambda: oai.batches.retrieve(created.id), lambda b: b.status == "in_progress")

    cancelling = await oai.batches.cancel(created.id)
    batch = await until(
        lambda: oai.batches.retrieve(created.id), lambda b: b.status != "cancelling"
    )

    assert (cancelling.status, cancelling.cancelling_at is not None) == ("cancelling", True)
    assert (batch.status, batch.cancelled_at is not None, batch.output_file_id) == (
        "cancelled",
        True,
        None,
    )
    errors = await file_rows(oai, batch.error_file_id)
    assert {cid: row["error"]["code"] for cid, row in errors.items()} == dict.fromkeys(
        cids, "batch_cancelled"
    )
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        await oai.batches.cancel(created.id)


async def test_expiry_by_control_call_by_marker_and_by_rate(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    await http.post("/_sim/config", json={"batch_delay_ms": 600_000})
    waiting = uid()
    file = await oai.files.create(
        file=("r.jsonl", openai_lines({waiting: chat_body("hi")})), purpose="batch"
    )
    running = await oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    expired = (await http.post(f"/_sim/batches/{running.id}/expire")).json()
    again = await http.post(f"/_sim/batches/{running.id}/expire")
    by_call = await oai.batches.retrieve(running.id)

    await http.post("/_sim/config", json={"batch_delay_ms": 20})
    marked, plain = uid(), uid()
    both = openai_lines({marked: chat_body("too late [batch-expire]"), plain: chat_body("ok")})
    _, by_marker = await openai_batch(oai, both)
    await http.post("/_sim/config", json={"batch_expire_rate": 1.0})
    _, by_rate = await openai_batch(oai, openai_lines({uid(): chat_body("unlucky")}))

    assert (expired["status"], again.status_code) == ("expired", 409)
    assert (by_call.status, by_call.expired_at is not None, by_call.output_file_id) == (
        "expired",
        True,
        None,
    )
    errors = await file_rows(oai, by_call.error_file_id)
    assert errors[waiting]["response"] is None
    assert errors[waiting]["error"]["code"] == "batch_expired"
    assert by_marker.status == "expired"
    assert set(await file_rows(oai, by_marker.output_file_id)) == {plain}
    marker_errors = await file_rows(oai, by_marker.error_file_id)
    assert marker_errors[marked]["error"]["code"] == "batch_expired"
    assert by_marker.request_counts is not None
    assert by_marker.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    assert (by_rate.status, by_rate.output_file_id) == ("expired", None)
    outcomes = (await http.get("/_sim/stats")).json()["batch_lines_by_outcome"]
    assert outcomes == {"expired": 3, "succeeded": 1}


# --- Anthropic Message Batches -----------------------------------------------------------------


async def test_anthropic_batch_through_the_sdk_answers_as_messages_does(
    claude: anthropic.AsyncAnthropic, http: httpx.AsyncClient, sim: SimulatorServer
) -> None:
    good, stopped, failing, invalid = uid(), uid(), uid(), uid()
    params = {
        good: claude_params("summarise this"),
        stopped: claude_params("one two three four", stop_sequences=["three"]),
        failing: claude_params("not now [batch-error:529]"),
        invalid: {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x"}]},
    }

    created = await claude.messages.batches.create(
        requests=[{"custom_id": cid, "params": p} for cid, p in params.items()]
    )
    batch = await until(
        lambda: claude.messages.batches.retrieve(created.id),
        lambda b: b.processing_status == "ended",
    )
    results = {r.custom_id: r.result async for r in await claude.messages.batches.results(batch.id)}
    raw = await http.get(batch.results_url or "", headers=ANTHROPIC_HEADERS)
    raw_results = {
        row["custom_id"]: row["result"] for row in map(json.loads, raw.text.splitlines())
    }

    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert (created.processing_status, created.results_url, created.ended_at) == (
        "in_progress",
        None,
        None,
    )
    assert created.request_counts.model_dump() == {
        "processing": 4,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.request_counts.model_dump() == {
        "processing": 0,
        "succeeded": 2,
        "errored": 2,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.ended_at is not None and batch.ended_at >= batch.created_at
    assert batch.results_url == f"{sim.url}/v1/messages/batches/{batch.id}/results"
    assert results[stopped].type == "succeeded"
    assert results[stopped].message.stop_reason == "stop_sequence"
    for cid in (good, stopped):
        message = raw_results[cid]["message"]
        assert raw_results[cid]["type"] == "succeeded"
        assert message["usage"].pop("service_tier") == "batch"
        sync = await http.post("/v1/messages", json=params[cid], headers=ANTHROPIC_HEADERS)
        expected = sync.json()
        assert expected["usage"].pop("service_tier") == "standard"
        for answer in (message, expected):
            answer.pop("id")
        assert message == expected
    failed, refused = results[failing], results[invalid]
    assert failed.type == "errored" and refused.type == "errored"
    assert (failed.error.type, failed.error.error.type) == ("error", "overloaded_error")
    assert refused.error.error.type == "invalid_request_error"
    assert "max_tokens" in refused.error.error.message
    stats = (await http.get("/_sim/stats")).json()
    assert stats["batches_by_request_id"] == {cid: [batch.id] for cid in params}
    assert not set(stats["calls_by_request_id"]) & set(params)


async def test_anthropic_batch_creation_refuses_what_the_api_refuses(
    claude: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    def batch(*custom_ids: str) -> list[Any]:
        return [{"custom_id": cid, "params": claude_params("hi")} for cid in custom_ids]

    with pytest.raises(anthropic.BadRequestError, match="Duplicate custom_id"):
        await claude.messages.batches.create(requests=batch("a", "a"))
    with pytest.raises(anthropic.BadRequestError, match="pattern"):
        await claude.messages.batches.create(requests=batch("has space"))
    with pytest.raises(anthropic.BadRequestError, match="at least one"):
        await claude.messages.batches.create(requests=[])
    with pytest.raises(anthropic.BadRequestError, match="at most 100000"):
        many = [{"custom_id": f"r{i}", "params": {}} for i in range(100_001)]
        await claude.messages.batches.create(requests=many)
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.batches.retrieve("msgbatch_missing")
    no_version = await http.post("/v1/messages/batches", json={"requests": batch("a")})
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"


async def test_a_canceled_anthropic_batch_ends_with_canceled_results(
    claude: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await http.post("/_sim/config", json={"batch_delay_ms": 600_000})
    cids = [uid(), uid()]
    created = await claude.messages.batches.create(
        requests=[{"custom_id": c, "params": claude_params("hi")} for c in cids]
    )
    early = await http.get(f"/v1/messages/batches/{created.id}/results", headers=ANTHROPIC_HEADERS)

    canceling = await claude.messages.batches.cancel(created.id)
    batch = await until(
        lambda: claude.messages.batches.retrieve(created.id),
        lambda b: b.processing_status == "ended",
    )
    results = {
        r.custom_id: r.result.type async for r in await claude.messages.batches.results(batch.id)
    }

    assert early.status_code == 404
    assert (canceling.processing_status, canceling.cancel_initiated_at is not None) == (
        "canceling",
        True,
    )
    assert batch.request_counts.canceled == 2 and batch.request_counts.processing == 0
    assert results == dict.fromkeys(cids, "canceled")


async def test_anthropic_expiry_by_rate_and_by_control_call(
    claude: anthropic.AsyncAnthropic, http: httpx.AsyncClient
) -> None:
    await http.post("/_sim/config", json={"batch_expire_rate": 1.0, "batch_delay_ms": 600_000})
    cid = uid()
    created = await claude.messages.batches.create(
        requests=[{"custom_id": cid, "params": claude_params("hi")}]
    )
    await http.post(f"/_sim/batches/{created.id}/expire")
    batch = await claude.messages.batches.retrieve(created.id)
    results = [r async for r in await claude.messages.batches.results(batch.id)]

    assert (batch.processing_status, batch.request_counts.expired) == ("ended", 1)
    assert [(r.custom_id, r.result.type) for r in results] == [(cid, "expired")]


# --- flex, keys, settings ----------------------------------------------------------------------


async def test_flex_answers_as_flex_or_429_when_flex_is_short(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    text = "classify this"
    standard = await oai.chat.completions.create(**chat_body(text))
    flex = await oai.chat.completions.create(**chat_body(text), service_tier="flex")
    busy_id = uid()
    headers = {"X-Client-Request-Id": busy_id}
    busy_body = chat_body("later please [flex-busy:2]", service_tier="flex")
    refusals = [
        await http.post("/v1/chat/completions", json=busy_body, headers=headers) for _ in range(2)
    ]
    third = await http.post("/v1/chat/completions", json=busy_body, headers=headers)
    as_standard = await http.post(
        "/v1/chat/completions", json=chat_body("later please [flex-busy]"), headers=headers
    )
    await http.post("/_sim/config", json={"flex_busy_rate": 1.0})
    with pytest.raises(openai.RateLimitError) as short:
        await oai.chat.completions.create(**chat_body(text), service_tier="flex")

    assert (standard.service_tier, flex.service_tier) == ("default", "flex")
    assert flex.choices[0].message.content == standard.choices[0].message.content
    assert [r.status_code for r in refusals] == [429, 429]
    assert {r.json()["error"]["code"] for r in refusals} == {"resource_unavailable"}
    assert (third.status_code, third.json()["service_tier"]) == (200, "flex")
    assert (as_standard.status_code, as_standard.json()["service_tier"]) == (200, "default")
    assert short.value.code == "resource_unavailable"
    stats = (await http.get("/_sim/stats")).json()
    assert stats["flex_calls_by_request_id"][busy_id] == 3  # the standard call is not a flex call
    assert stats["flex_busy_total"] == 3
    assert stats["calls_by_request_id"][busy_id] == 4


async def test_batch_endpoints_take_the_api_key_as_the_synchronous_ones_do() -> None:
    settings = SimulatorSettings(port=0, latency_ms=0, api_key=SecretStr("right"))
    async with SimulatorServer(settings) as sim:
        content = openai_lines({uid(): chat_body("hi")})
        async with openai.AsyncOpenAI(
            base_url=f"{sim.url}/v1", api_key="wrong", max_retries=0
        ) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.files.create(file=("r.jsonl", content), purpose="batch")
            with pytest.raises(openai.AuthenticationError):
                await wrong.batches.list()
        async with anthropic.AsyncAnthropic(
            base_url=sim.url, api_key="wrong", max_retries=0
        ) as wrong_claude:
            with pytest.raises(anthropic.AuthenticationError):
                await wrong_claude.messages.batches.retrieve("msgbatch_x")
        async with openai.AsyncOpenAI(
            base_url=f"{sim.url}/v1", api_key="right", max_retries=0
        ) as right:
            file = await right.files.create(file=("r.jsonl", content), purpose="batch")
        assert file.purpose == "batch"


async def test_batch_and_flex_settings_from_environment_config_and_reset(
    monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    monkeypatch.setenv("LLMSTREAM_SIM_BATCH_DELAY_MS", "5")
    monkeypatch.setenv("LLMSTREAM_SIM_BATCH_EXPIRE_RATE", "0.5")
    monkeypatch.setenv("LLMSTREAM_SIM_FLEX_BUSY_RATE", "0.25")
    from_env = SimulatorSettings()
    fields = SimulatorSettings.model_fields
    _, batch = await openai_batch(oai, openai_lines({uid(): chat_body("hi")}))
    changed = (
        await http.post("/_sim/config", json={"batch_delay_ms": 10, "flex_busy_rate": 1})
    ).json()
    bad = await http.post("/_sim/config", json={"batch_expire_rate": 2})
    stats = (await http.post("/_sim/reset")).json()

    assert (from_env.batch_delay_ms, from_env.batch_expire_rate, from_env.flex_busy_rate) == (
        5.0,
        0.5,
        0.25,
    )
    assert (fields["batch_delay_ms"].default, fields["batch_expire_rate"].default) == (2000.0, 0.0)
    assert (changed["batch_delay_ms"], changed["flex_busy_rate"]) == (10.0, 1.0)
    assert bad.status_code == 400
    assert (stats["config"]["batch_delay_ms"], stats["config"]["flex_busy_rate"]) == (50.0, 0.0)
    assert (stats["batches_total"], stats["batches_by_request_id"]) == (0, {})
    with pytest.raises(openai.NotFoundError):
        await oai.batches.retrieve(batch.id)
