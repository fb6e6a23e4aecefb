"""The provider adapters pointed at a server of the tests' (the simulator, a loopback server),
and one HTTP client for a module's adapters (import the ``client`` fixture to use it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from pydantic import SecretStr

from llmstream.processors.providers import create_http_client
from llmstream.processors.providers.anthropic import AnthropicMessages
from llmstream.processors.providers.http import HTTPAdapter
from llmstream.processors.providers.openai import OpenAICompatible

__all__ = ["TEST_KEYS", "adapter", "client"]

TEST_KEYS = {"openai": "sk-test-1", "anthropic": "sk-ant-test-1"}


def adapter(
    wire: str, url: str, client: aiohttp.ClientSession, key: str | None = None
) -> HTTPAdapter:
    """The ``wire`` adapter for the API served at ``url`` (OpenAI's below ``/v1``, as its base
    URL is documented), with ``key`` or the wire's test key."""
    secret = SecretStr(key or TEST_KEYS[wire])
    if wire == "openai":
        return OpenAICompatible("openai", client, f"{url}/v1", secret)
    return AnthropicMessages("anthropic", client, url, secret)


@pytest_asyncio.fixture(scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    http = create_http_client(timeout_s=10.0, max_connections=50)
    yield http
    await http.close()
