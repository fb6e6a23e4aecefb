"""``POST /v1/tools/{name}/execute`` served over loopback HTTP (uvicorn, the app's lifespan
connecting its parts) in front of a real HTTP tool: behind the API keys, one tool call per
request, every failure of the tool a result, not an HTTP error."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from llmstream.core.tools import ToolRegistry, ToolSpec
from tests.conftest import Services
from tests.harness import serve_app
from tests.loopback import LoopbackServer, Received, Reply
from tests.test_ingress import API_KEYS, KEY_A
from tests.test_sessions_api import api_app, api_settings, key

pytestmark = pytest.mark.integration


def _tool(received: Received) -> Reply:
    if received.path == "/broken":
        return Reply.json({"message": "database down"}, status=503)
    city = received.json()["city"]
    return Reply.json({"city": city, "temperature_c": 21})


def registry(url: str) -> ToolRegistry:
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    return ToolRegistry(
        ToolSpec.model_validate(
            {"name": name, "description": "The weather.", "url": f"{url}{path}", **extra}
        )
        for name, path, extra in [
            ("get_weather", "/weather", {"parameters": parameters}),
            ("broken", "/broken", {}),
        ]
    )


async def test_execute_runs_the_registered_tool_for_an_authenticated_caller(
    services: Services, unique: str
) -> None:
    async with LoopbackServer(_tool) as tool:
        app = api_app(api_settings(services, unique, api_keys=API_KEYS), registry(tool.url))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:

            async def call(name: str, body: Any, **headers: str) -> httpx.Response:
                return await client.post(
                    f"/v1/tools/{name}/execute",
                    content=orjson.dumps(body),
                    headers={"content-type": "application/json", **headers},
                )

            ran = await call("get_weather", {"city": "Oslo"}, **key(KEY_A))
            calls_after_one = len(tool.received)
            anonymous = await call("get_weather", {"city": "Oslo"})
            unknown = await call("search", {"q": "x"}, **key(KEY_A))
            bad_name = await call("no%20such", {}, **key(KEY_A))
            invalid = await call("get_weather", {"town": "Oslo"}, **key(KEY_A))
            not_object = await call("get_weather", ["Oslo"], **key(KEY_A))
            failing = await call("broken", {}, **key(KEY_A))
            as_text = await client.post(
                "/v1/tools/get_weather/execute",
                content=b'{"city": "Oslo"}',
                headers={"content-type": "text/plain", **key(KEY_A)},
            )
            documented = (await client.get("/openapi.json")).json()

    assert ran.status_code == 200
    result = ran.json()
    assert (result["status"], result["error"], result["error_type"]) == ("ok", None, None)
    assert orjson.loads(result["content"]) == {"city": "Oslo", "temperature_c": 21}
    assert result["latency_ms"] >= 0
    assert calls_after_one == 1
    # The tool saw one call only: no other request reached it but the failing tool's.
    assert [(r.path, r.json()) for r in tool.received] == [
        ("/weather", {"city": "Oslo"}),
        ("/broken", {}),
    ]
    assert anonymous.status_code == 401
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert bad_name.status_code == 422
    assert invalid.status_code == 200
    assert invalid.json()["error_type"] == "invalid_arguments"
    assert '"city" is a required property' in invalid.json()["error"]
    assert not_object.status_code == 422
    assert failing.status_code == 200
    assert failing.json()["error_type"] == "http_error"
    assert orjson.loads(failing.json()["content"]) == {
        "error": "the tool broken answered HTTP 503",
        "detail": {"message": "database down"},
    }
    assert as_text.status_code == 415
    operation = documented["paths"]["/v1/tools/{name}/execute"]["post"]
    assert {"200", "404", "401", "422"} <= set(operation["responses"])
    assert set(documented["paths"]["/v1/sessions/{session_id}"]) == {"get", "delete"}
