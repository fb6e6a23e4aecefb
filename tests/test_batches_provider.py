"""The batch tier against a provider that misbehaves: a loopback server in front of the simulator
refuses or fails submissions, garbles a result line, or lists OpenAI batches (as the simulator
now also does: tests/test_batches_adopt.py runs that path against the simulator directly), so
that a dead submitter's batch can be looked up by its metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import orjson

from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.providers.settings import EndpointConfig
from llmstream.schemas.models import LLMError, LLMResponse
from tests.conftest import Services
from tests.loopback import LoopbackServer, Received, Reply
from tests.test_batches import (
    ANTHROPIC,
    OPENAI,
    batch_request,
    batch_rig,
    batch_settings,
    dead_worker,
    sim,
    stats,
    submit_until,
)

__all__ = ["sim"]  # the simulator fixture, shared with tests/test_batches.py

_FORWARDED = ("content-type", "authorization", "x-api-key", "anthropic-version")


class ProviderFront:
    """Forwards every call to the simulator, but first answers ``fail[(method, path)]`` replies
    in turn; rewrites bodies with ``rewrite``; with ``listing``, answers ``GET /v1/batches`` with
    the OpenAI batches it saw created, newest first, as OpenAI lists them."""

    def __init__(self, sim_url: str, *, listing: bool = False) -> None:
        self.sim_url = sim_url
        self.listing = listing
        self.fail: dict[tuple[str, str], list[Reply]] = {}
        self.rewrite: Callable[[Received, bytes], bytes] | None = None
        self.created: list[dict[str, object]] = []
        self.server = LoopbackServer(self._handle)
        self._client: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def _handle(self, received: Received) -> Reply:
        waiting = self.fail.get((received.method, received.path))
        if waiting:
            return waiting.pop(0)
        if self.listing and (received.method, received.path) == ("GET", "/v1/batches"):
            data = list(reversed(self.created))
            return Reply.json({"object": "list", "data": data, "has_more": False})
        assert self._client is not None
        headers = {k: v for k, v in received.headers.items() if k in _FORWARDED}
        async with self._client.request(
            received.method,
            f"{self.sim_url}{received.path}",
            params=received.query,
            data=received.body,
            headers=headers,
        ) as answer:
            status, body = answer.status, await answer.read()
            kind = answer.content_type
        if (received.method, received.path) == ("POST", "/v1/batches") and status == 200:
            self.created.append(orjson.loads(body))
        if self.rewrite is not None:
            body = self.rewrite(received, body)
        return Reply(status, {"content-type": kind}, body)


@asynccontextmanager
async def front(sim: SimulatorServer, *, listing: bool = False) -> AsyncIterator[ProviderFront]:
    proxy = ProviderFront(sim.url, listing=listing)
    async with aiohttp.ClientSession() as client, proxy.server:
        proxy._client = client
        yield proxy


def error(status: int, message: str) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Reply.json({"error": {"message": message, "type": kind, "code": None}}, status)


async def test_a_refused_or_failed_openai_submission_is_sent_again_until_accepted(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("resent", OPENAI, "again")
    async with front(sim, listing=True) as proxy:
        proxy.fail[("POST", "/v1/files")] = [error(400, "The file could not be read.")]
        proxy.fail[("POST", "/v1/batches")] = [error(500, "The server had an error.")]
        async with batch_rig(sim, settings, openai_url=proxy.url) as rig:
            await rig.process(original)
            [response] = await rig.outcomes(1)
            retried = rig.sample(
                "llmstream_batch_submissions_total", provider="openai", result="retried"
            )
        # After the failed creation the batch list was asked first: none had been created.
        asked = [r.path for r in proxy.server.received if r.method == "GET"]
        assert "/v1/batches" in asked
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    assert retried == 2
    seen = await stats(sim)
    assert len(seen["batches_by_request_id"]["resent"]) == 1
    assert seen["calls_by_request_id"] == {}


async def test_a_refused_or_overloaded_anthropic_submission_is_sent_again_until_accepted(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("resent-anthropic", ANTHROPIC, "again")
    overloaded = Reply.json(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529
    )
    async with front(sim) as proxy:
        refused = error(400, "requests.0.params: invalid")
        proxy.fail[("POST", "/v1/messages/batches")] = [overloaded, refused]
        async with batch_rig(sim, settings, anthropic_url=proxy.url) as rig:
            await rig.process(original)
            [response] = await rig.outcomes(1)
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    assert len((await stats(sim))["batches_by_request_id"]["resent-anthropic"]) == 1


async def test_a_dead_submitters_openai_batch_is_found_by_its_metadata_and_adopted(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("adopted", OPENAI, "found")
    async with (
        front(sim, listing=True) as proxy,
        batch_rig(sim, settings, openai_url=proxy.url) as rig,
    ):
        async with dead_worker(settings) as doomed:
            # Died once the provider accepted the batch, before recording it (step 4).
            _, batch = await submit_until(doomed, rig, original, last_step=3)
        await rig.process(original)  # its event again
        [response] = await rig.outcomes(1)
        adopted = rig.sample(
            "llmstream_batch_submissions_total", provider="openai", result="adopted"
        )
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    assert adopted == 1
    assert (await stats(sim))["batches_by_request_id"] == {"adopted": [batch]}


async def test_where_batches_cannot_be_listed_a_dead_submitters_batch_is_paid_twice_answered_once(
    services: Services, sim: SimulatorServer
) -> None:
    # The window core/record/batches.py documents: Anthropic's batches cannot be looked up by
    # submission, so the taker cannot know the dead submitter's batch exists, and sends the
    # request again.
    settings = batch_settings(services)
    original = batch_request("twice", ANTHROPIC, "unknown")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            await submit_until(doomed, rig, original, last_step=3)
        await rig.process(original)
        [response] = await rig.outcomes(1)
    assert isinstance(response, LLMResponse)
    assert len((await stats(sim))["batches_by_request_id"]["twice"]) == 2


async def test_a_result_line_that_cannot_be_read_fails_its_request_with_the_line_kept(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    garbled = b'{"custom_id":"garbled","result":{"type":"succeeded","message":{"content":7}}}'

    def garble(received: Received, body: bytes) -> bytes:
        if not received.path.endswith("/results"):
            return body
        lines = [garbled if b'"garbled"' in line else line for line in body.splitlines()]
        return b"\n".join(lines) + b"\n"

    async with front(sim) as proxy:
        proxy.rewrite = garble
        async with batch_rig(sim, settings, anthropic_url=proxy.url) as rig:
            await rig.process(batch_request("garbled", ANTHROPIC, "fine"))
            await rig.process(batch_request("intact", ANTHROPIC, "fine"))
            outcomes = {o.request_id: o for o in await rig.outcomes(2)}
    failed = outcomes["garbled"]
    assert isinstance(failed, LLMError)
    assert (failed.error_type, failed.retryable) == ("provider_error", False)
    assert failed.raw_payload == garbled  # kept for replay, with the request itself
    assert failed.request is not None and failed.request.request_id == "garbled"
    assert isinstance(outcomes["intact"], LLMResponse)


async def test_batch_on_a_provider_without_a_batch_api_is_served_as_standard(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    vllm = EndpointConfig(kind="openai", base_url=f"{sim.url}/v1")
    original = batch_request("no-batches", "vllm/some-model", "now")
    async with batch_rig(sim, settings, endpoints={"vllm": vllm}) as rig:
        await rig.process(original)
        [response] = rig.responses()
    assert response.service_tier == "standard"
    seen = await stats(sim)
    assert seen["calls_by_request_id"] == {"no-batches": 1}
    assert seen["batches_by_request_id"] == {}
