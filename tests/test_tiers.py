"""Which tier serves a request: choose_tier's rules, the settings that steer them, and the tier a
worker's response reports (on the real Redis, the simulator over loopback HTTP)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

from llmstream.core.clock import wall_clock_ms
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.tiers import TierParams, choose_tier, flex_capable
from llmstream.schemas.models import LLMRequest
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import rig, sim, worker_settings

__all__ = ["sim"]

NOW = 1_700_000_000_000
HOUR_MS = 3_600_000


def chosen(
    service_tier: str | None = None,
    deadline_in_s: float | None = None,
    *,
    batch: bool = True,
    flex: bool = True,
    **params: Any,
) -> str:
    deadline = None if deadline_in_s is None else NOW + int(deadline_in_s * 1000)
    asked = request("tier-1", service_tier=service_tier, deadline_ms=deadline)
    return choose_tier(
        asked, now_ms=NOW, params=TierParams(**params), batch_capable=batch, flex_capable=flex
    )


def test_a_named_tier_is_served_where_the_provider_has_it() -> None:
    assert [chosen(tier) for tier in ("standard", "flex", "batch")] == ["standard", "flex", "batch"]
    # A deadline does not change a tier the request names.
    assert chosen("batch", deadline_in_s=5) == "batch"
    assert chosen("standard", deadline_in_s=30 * 3600) == "standard"


def test_a_tier_the_provider_lacks_is_served_as_standard() -> None:
    assert chosen("batch", batch=False) == "standard"
    assert chosen("flex", flex=False) == "standard"
    assert chosen("auto", deadline_in_s=30 * 3600, batch=False) == "standard"
    assert chosen("auto", deadline_in_s=3600, flex=False) == "standard"


def test_auto_goes_by_how_far_off_the_deadline_is() -> None:
    # Defaults: batch from 25 h (90,000 s), flex from 600 s.
    assert chosen("auto", deadline_in_s=90_000) == "batch"
    assert chosen("auto", deadline_in_s=89_999) == "flex"
    assert chosen("auto", deadline_in_s=600) == "flex"
    assert chosen("auto", deadline_in_s=599) == "standard"
    assert chosen("auto", deadline_in_s=-5) == "standard"  # already late
    tuned = {"batch_min_deadline_s": 3600, "flex_min_deadline_s": 60}
    assert chosen("auto", deadline_in_s=3600, **tuned) == "batch"
    assert chosen("auto", deadline_in_s=60, **tuned) == "flex"


def test_auto_without_a_deadline_and_a_request_without_a_tier_follow_the_settings() -> None:
    assert chosen("auto") == "standard"
    assert chosen("auto", auto_tier_without_deadline="batch") == "batch"
    assert chosen("auto", auto_tier_without_deadline="flex", flex=False) == "standard"
    assert chosen() == "standard"
    assert chosen(default_service_tier="flex") == "flex"
    assert chosen(default_service_tier="auto", deadline_in_s=2 * 3600) == "flex"
    assert chosen(default_service_tier="batch", batch=False) == "standard"


def test_the_worker_reads_the_tier_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "LLMSTREAM_DEFAULT_SERVICE_TIER": "auto",
        "LLMSTREAM_BATCH_MAX_REQUESTS": "5000",
        "LLMSTREAM_BATCH_MAX_WAIT_S": "15",
        "LLMSTREAM_BATCH_MIN_DEADLINE_S": "7200",
        "LLMSTREAM_BATCH_POLL_INTERVAL_S": "5",
        "LLMSTREAM_FLEX_MIN_DEADLINE_S": "120",
        "LLMSTREAM_AUTO_TIER_WITHOUT_DEADLINE": "flex",
    }.items():
        monkeypatch.setenv(name, value)

    settings = WorkerSettings()

    assert (settings.default_service_tier, settings.auto_tier_without_deadline) == ("auto", "flex")
    assert (settings.batch_max_requests, settings.batch_max_wait_s) == (5000, 15.0)
    assert (settings.batch_min_deadline_s, settings.batch_poll_interval_s) == (7200.0, 5.0)
    assert settings.flex_min_deadline_s == 120.0
    monkeypatch.setenv("LLMSTREAM_DEFAULT_SERVICE_TIER", "economy")
    with pytest.raises(ValidationError):
        WorkerSettings()


def test_defaults() -> None:
    params = TierParams()
    assert params.model_dump() == {
        "default_service_tier": "standard",
        "batch_max_requests": 1000,
        "batch_max_wait_s": 60.0,
        "batch_min_deadline_s": 90_000.0,
        "batch_poll_interval_s": 30.0,
        "flex_min_deadline_s": 600.0,
        "auto_tier_without_deadline": "standard",
    }


async def test_flex_is_offered_by_the_openai_wire_format_only(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        openai, _ = r.router.resolve(request("x", model="openai/gpt-4o-mini"))
        anthropic, _ = r.router.resolve(request("x", model="anthropic/claude-3-5-haiku"))
        assert (flex_capable(openai), flex_capable(anthropic)) == (True, False)


async def test_an_unknown_tier_is_refused_as_an_invalid_request(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = f"tier-{uuid.uuid4().hex}"
        body = request(rid).model_dump(mode="json")
        body["service_tier"] = "economy"

        await r.process(orjson.dumps(body))

        [error] = r.errors()
        assert (error.request_id, error.error_type) == (rid, "invalid_request")
        assert "service_tier" in error.message
        assert await r.calls(rid) == []
    with pytest.raises(ValidationError):
        LLMRequest.model_validate(body)


@pytest.mark.parametrize(
    ("settings", "fields", "served"),
    [
        ({}, {"service_tier": "auto", "deadline_in_s": 3600}, "flex"),
        ({}, {"service_tier": "auto", "deadline_in_s": 60}, "standard"),
        ({}, {"service_tier": "auto"}, "standard"),
        ({"auto_tier_without_deadline": "flex"}, {"service_tier": "auto"}, "flex"),
        ({"default_service_tier": "flex"}, {}, "flex"),
        ({"default_service_tier": "flex"}, {"service_tier": "standard"}, "standard"),
    ],
)
async def test_the_worker_serves_and_reports_the_tier_chosen(
    services: Services,
    sim: SimulatorServer,
    settings: dict[str, Any],
    fields: dict[str, Any],
    served: str,
) -> None:
    async with rig(sim, worker_settings(services.redis_url, **settings)) as r:
        rid = f"tier-{uuid.uuid4().hex}"
        fields = dict(fields)
        deadline_in_s = fields.pop("deadline_in_s", None)
        if deadline_in_s is not None:
            fields["deadline_ms"] = wall_clock_ms() + deadline_in_s * 1000

        await r.process(request(rid, **fields))

        [response] = r.responses()
        async with httpx.AsyncClient() as control:
            stats = (await control.get(f"{r.sim.url}/_sim/stats")).json()
        assert response.service_tier == served
        assert (rid in stats["flex_calls_by_request_id"]) == (served == "flex")
