"""What the ingress answers to a body it cannot take: too large (413, saying the limit) or not
sent as JSON (415, naming the header). The whole app in-process (its middleware and error
handlers), connected to the real broker and Redis; nothing may reach the topic."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.ingress.app import create_app
from llmstream.schemas.models import MAX_CONTENT_CHARS
from tests.harness import in_process_ingress, read_raw
from tests.test_ingress import chat_body, ingress_settings

pytestmark = pytest.mark.integration

OVER_LIMIT = "x" * 2_000_000
SIZE_MESSAGE = "messages.0.content is 2,000,000 characters; the limit is 1,000,000"
TYPE_FIX = "send the body as JSON with 'Content-Type: application/json'"


@pytest.fixture
async def client(settings: ServiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process_ingress(ingress_settings(settings, max_body_bytes=4 * 1024 * 1024)) as c:
        yield c


async def nothing_published(settings: ServiceSettings) -> bool:
    return await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1, 1.5) == []


def error_of(answer: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = answer.json()["error"]
    return error


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/chat/completions"])
async def test_a_message_over_the_content_limit_is_413_saying_the_limit(
    settings: ServiceSettings, client: httpx.AsyncClient, path: str
) -> None:
    answer = await client.post(path, json=chat_body(OVER_LIMIT))

    assert answer.status_code == 413, answer.text
    error = error_of(answer)
    assert error["message"] == SIZE_MESSAGE
    assert (error["param"], error["code"]) == ("messages.0.content", "content_too_long")
    assert await nothing_published(settings)


async def test_one_character_over_is_refused_and_other_faults_are_listed_too(
    client: httpx.AsyncClient,
) -> None:
    batch = {
        "requests": [
            chat_body("fine"),
            {**chat_body("x" * (MAX_CONTENT_CHARS + 1)), "temperature": 9},
        ]
    }

    answer = await client.post("/v1/requests", json=batch)

    assert answer.status_code == 413, answer.text
    error = error_of(answer)
    assert error["message"] == (
        "requests.1.messages.0.content is 1,000,001 characters; the limit is 1,000,000 "
        "(and 1 more invalid fields)"
    )
    assert [f["field"] for f in error["fields"]] == [
        "requests.1.messages.0.content",
        "requests.1.temperature",
    ]


async def test_a_body_over_the_byte_limit_is_413_naming_the_limit_and_setting(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post(
        "/v1/requests",
        content=json.dumps(chat_body("y" * 5_000_000)),
        headers={"Content-Type": "application/json"},
    )

    assert answer.status_code == 413
    assert error_of(answer)["message"] == (
        "body: larger than 4,194,304 bytes, the limit (LLMSTREAM_MAX_BODY_BYTES)"
    )


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/chat/completions"])
async def test_a_json_body_without_content_type_is_415_naming_the_header(
    settings: ServiceSettings, client: httpx.AsyncClient, path: str
) -> None:
    body = json.dumps(chat_body("hello")).encode()

    missing = await client.post(path, content=body)
    plain = await client.post(path, content=body, headers={"Content-Type": "text/plain"})

    assert "content-type" not in missing.request.headers
    assert missing.status_code == 415, missing.text
    assert error_of(missing)["message"] == f"Content-Type: the header is missing; {TYPE_FIX}"
    assert plain.status_code == 415
    assert error_of(plain)["message"] == f"Content-Type: must be application/json; {TYPE_FIX}"
    assert (error_of(plain)["param"], error_of(plain)["code"]) == (
        "Content-Type",
        "unsupported_media_type",
    )
    assert await nothing_published(settings)


async def test_json_with_a_charset_is_accepted_and_bad_json_is_still_a_validation_error(
    settings: ServiceSettings, client: httpx.AsyncClient
) -> None:
    accepted = await client.post(
        "/v1/requests",
        content=json.dumps(chat_body("hello")).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    not_an_object = await client.post("/v1/requests", json=["not", "an", "object"])

    assert accepted.status_code == 202, accepted.text
    assert not_an_object.status_code == 422
    assert error_of(not_an_object)["param"] == "body"
    assert await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1) != []


def test_the_openapi_document_lists_413_and_415_for_json_bodies(settings: ServiceSettings) -> None:
    paths = create_app(ingress_settings(settings)).openapi()["paths"]

    for path in ("/v1/requests", "/v1/chat/completions"):
        answers = paths[path]["post"]["responses"]
        assert "1,000,000 characters" in answers["413"]["description"]
        assert "Content-Type: application/json" in answers["415"]["description"]
    assert "415" not in paths["/v1/requests/{request_id}"]["get"]["responses"]
