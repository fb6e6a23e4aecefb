"""The worker's start-up check of the result TTL against the broker's retentions."""

from __future__ import annotations

import logging

import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.processors.retention import RetentionError, check_retention, retention_problem
from llmstream.processors.settings import WorkerSettings
from tests.conftest import Services

WEEK_S = 7 * 24 * 3600


def test_a_ttl_that_outlasts_both_retentions_passes() -> None:
    assert retention_problem(WEEK_S, WEEK_S * 1000, WEEK_S // 60) is None
    assert retention_problem(WEEK_S, None, None) is None  # unknown: not refused


def test_a_longer_topic_retention_names_the_setting_and_both_values() -> None:
    problem = retention_problem(3600, 2 * 3600 * 1000, 60)
    assert problem is not None
    assert problem.startswith("LLMSTREAM_RESULT_TTL_S=3600 is shorter than retention.ms=7200000")
    assert "offsets.retention.minutes" not in problem
    assert "LLMSTREAM_ACCEPT_RETENTION_BEYOND_TTL=true" in problem


def test_infinite_retention_and_longer_offset_retention_are_refused() -> None:
    problem = retention_problem(WEEK_S, -1, 2 * WEEK_S // 60)
    assert problem is not None
    assert "retention.ms=-1" in problem and "offsets.retention.minutes=20160" in problem


@pytest.mark.integration
async def test_the_test_broker_is_checked_or_said_to_be_uncheckable(
    services: Services, settings: ServiceSettings, caplog: pytest.LogCaptureFixture
) -> None:
    worker = WorkerSettings(**{**settings.model_dump(), "result_ttl_s": 60})
    if services.idempotent_producer:  # Apache Kafka: a week of retention by default
        with pytest.raises(RetentionError, match=r"^LLMSTREAM_RESULT_TTL_S=60 is shorter than"):
            await check_retention(worker)
        return
    # The embedded Tansu broker closes the connection on DescribeConfigs.
    with caplog.at_level(logging.WARNING, logger="llmstream.processors.retention"):
        await check_retention(worker)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "LLMSTREAM_RESULT_TTL_S=60 is not checked" in line
