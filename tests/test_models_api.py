"""``GET /v1/models``: the provider/model names configuration knows, in OpenAI's list shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from llmstream.core.catalog import BUILTIN_MODELS, Catalog, CatalogParams
from llmstream.core.settings import ServiceSettings
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from tests.harness import serve_app

SECRET = "sk-endpoint-secret-not-a-real-key"


def test_the_catalog_holds_every_configured_name_and_no_credential(tmp_path: Path) -> None:
    prices_file = tmp_path / "prices.json"
    prices_file.write_text(json.dumps({"vllm/llama-3-70b": {"input": 0.5, "output": 1}}))
    providers_file = tmp_path / "providers.json"
    providers_file.write_text(
        json.dumps(
            {"gpu": {"kind": "openai", "base_url": "http://gpu:8000/v1", "models": ["qwen-2"]}}
        )
    )
    params = CatalogParams(
        prices={
            "openai/gpt-5": {"input": 1, "output": 2},
            "bare-finetune": {"input": 1, "output": 1},
        },
        prices_file=prices_file,
        fallbacks={"openai/gpt-4o": ["anthropic/claude-sonnet-4", "openrouter/meta/llama"]},
        rate_limits={"openai": {"rpm": 600}, "anthropic/claude-opus-4": {"tpm": 1000}},
        providers={
            "vllm": {
                "kind": "openai",
                "base_url": "http://vllm:8000/v1",
                "api_key": SECRET,
                "headers": {"X-Token": SECRET},
                "models": ["llama-3-8b"],
            }
        },
        providers_file=providers_file,
    )
    catalog = Catalog.from_settings(params)
    ids = [m.id for m in catalog.models]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert set(BUILTIN_MODELS) <= set(ids)
    expected = {
        "openai/gpt-5",
        "vllm/llama-3-70b",
        "anthropic/claude-sonnet-4",
        "openrouter/meta/llama",
        "anthropic/claude-opus-4",
        "vllm/llama-3-8b",
        "gpu/qwen-2",
    }
    assert expected <= set(ids)
    assert "bare-finetune" not in ids and "openai" not in ids  # no provider named / no model
    assert {m.provider for m in catalog.models if m.id == "openrouter/meta/llama"} == {"openrouter"}
    # The endpoints' credentials were dropped as they were read.
    assert SECRET not in repr(params) and SECRET not in params.model_dump_json()


@pytest.mark.integration
async def test_the_openai_sdk_lists_and_retrieves_the_configured_models(
    settings: ServiceSettings,
) -> None:
    values: dict[str, Any] = {**settings.model_dump(), "rate_limit_per_minute": 0}
    ingress = IngressSettings(
        **values,
        fallbacks={"openai/gpt-4o-mini": ["anthropic/claude-3-5-haiku"]},
        rate_limits={"vllm/llama-3": {"rpm": 60}},
    )
    async with serve_app(create_app(ingress)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            listed = [model async for model in await client.models.list()]
            one = await client.models.retrieve("vllm/llama-3")
            with pytest.raises(openai.NotFoundError) as unknown:
                await client.models.retrieve("nobody/none")
        finally:
            await client.close()
    ids = [m.id for m in listed]
    assert "vllm/llama-3" in ids and "anthropic/claude-3-5-haiku" in ids
    assert set(BUILTIN_MODELS) <= set(ids)
    assert {m.object for m in listed} == {"model"}
    assert {m.owned_by for m in listed if m.id.startswith("openai/")} == {"openai"}
    assert (one.id, one.owned_by, one.object) == ("vllm/llama-3", "vllm", "model")
    assert unknown.value.body["code"] == "not_found"  # type: ignore[index]


def test_the_ingress_reads_the_workers_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_FALLBACKS", '{"openai/gpt-4o": ["ollama/llama3"]}')
    monkeypatch.setenv(
        "LLMSTREAM_PROVIDERS",
        json.dumps({"local": {"kind": "openai", "base_url": "http://x:1", "api_key": SECRET}}),
    )
    catalog = Catalog.from_settings(IngressSettings())
    assert "ollama/llama3" in catalog and "openai/gpt-4o" in catalog
    assert SECRET not in repr(IngressSettings())
