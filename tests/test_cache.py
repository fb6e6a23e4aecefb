"""The response cache on the real Redis (alone, and in the worker's request path against the
provider simulator), and the price table."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.cache import ResponseCache
from llmstream.processors.pricing import Price, PriceTable, load_prices_file
from llmstream.processors.providers import Completion
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import rig, worker_settings

ANSWER = Completion("echo: hi", "stop", 1, 2, 3, "openai", "gpt-4o-mini")


@pytest.mark.integration
async def test_miss_store_hit_and_expiry(redis_client: aioredis.Redis, unique: str) -> None:
    cache = ResponseCache(redis_client, key_prefix=f"test-{unique}:", ttl_s=60)
    key = cache.key(request("r1", text="hi"), "openai", "gpt-4o-mini")
    assert await cache.get(key) == (None, "miss")
    assert await cache.put(key, ANSWER) == "store"
    assert await cache.get(key) == (ANSWER, "hit")
    assert 0 < await redis_client.ttl(key) <= 60


def test_key_is_what_was_asked_and_nothing_else() -> None:
    cache = ResponseCache(None, key_prefix="k:", ttl_s=1)  # type: ignore[arg-type]

    def key(provider: str = "openai", model: str = "gpt-4o-mini", **kw: object) -> str:
        fields: dict[str, object] = {"text": "hi", **kw}
        return cache.key(request("r", **fields), provider, model)  # type: ignore[arg-type]

    base = key()
    assert base.startswith("k:cache:") and len(base) == len("k:cache:") + 64
    # Not part of the question: the request ID, metadata, deadline, cache flag.
    other = request("other-id", text="hi", metadata={"a": "b"}, cache=True, deadline_ms=1)
    assert cache.key(other, "openai", "gpt-4o-mini") == base
    # Part of it: who asked, the model, the provider, the messages and every generation parameter.
    different = [
        key(client_id="c"),
        key(model="gpt-4o"),
        key(provider="openrouter"),
        key(text="hi!"),
        key(temperature=0.0),
        key(temperature=0.5),
        key(top_p=0.9),
        key(max_tokens=5),
        key(stop=["."]),
    ]
    assert len({base, *different}) == len(different) + 1


@pytest.mark.integration
async def test_one_clients_cached_answer_is_not_served_to_another(
    services: Services, simulator: SimulatorServer
) -> None:
    async with rig(simulator, worker_settings(services.redis_url)) as r:
        for request_id, client in (("a-1", "a"), ("b-1", "b"), ("a-2", "a")):
            await r.process(request(request_id, text="same question", cache=True, client_id=client))
        calls = {rid: len(await r.calls(rid)) for rid in ("a-1", "b-1", "a-2")}

    # b asked what a asked: b's answer is its own provider call, and says nothing about a's.
    assert [(x.request_id, x.cached) for x in r.responses()] == [
        ("a-1", False),
        ("b-1", False),
        ("a-2", True),
    ]
    assert calls == {"a-1": 1, "b-1": 1, "a-2": 0}


def test_prices_builtin_override_and_unknown(tmp_path: object) -> None:
    table = PriceTable({"openai/gpt-4o": Price(input=1.0, output=2.0)})
    # gpt-4o-mini: $0.15 in, $0.60 out per million.
    assert table.cost("openai", "gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    # Dated snapshots and -latest aliases cost what their model costs.
    assert table.cost("openai", "gpt-4o-mini-2024-07-18", 1000, 0) == pytest.approx(0.00015)
    assert table.cost("anthropic", "claude-3-5-haiku-latest", 0, 1000) == pytest.approx(0.004)
    assert table.cost("anthropic", "claude-3-5-sonnet-20241022", 1000, 1000) == pytest.approx(0.018)
    # Configuration wins over the table; the same model elsewhere keeps the list price.
    assert table.cost("openai", "gpt-4o", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.cost("openrouter", "gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    # Unknown: None, never a guess.
    assert table.cost("ollama", "llama3", 10, 10) is None


def test_prices_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "prices.toml"  # type: ignore[operator]
    path.write_text('["vllm/my-model"]\ninput = 0.1\noutput = 0.2\n')
    table = PriceTable(load_prices_file(path))
    assert table.cost("vllm", "my-model", 1_000_000, 1_000_000) == pytest.approx(0.3)
