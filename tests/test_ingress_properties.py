"""Property-based: whatever schemathesis sends per the ingress's own OpenAPI document, no 5xx.

The ingress runs for real (uvicorn on loopback) with Kafka and Redis behind it, and a worker with
the simulator, so valid chat completions are answered rather than timing out.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from llmstream.devtools.embedded import create_topics
from llmstream.devtools.processes import ChildProcess, free_port, topic_names
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from tests.conftest import Services, scoped_test_settings
from tests.harness import WorkerProcess, serve_app, worker_env

pytestmark = [
    pytest.mark.integration,
    # schemathesis 4.32 draws from the `random` module inside its strategies; Hypothesis warns
    # about that (its concern is replayability, not our API). Not ours to fix.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

# The document comes from the code alone: building the app connects to nothing.
schema = schemathesis.openapi.from_dict(create_app(IngressSettings()).openapi())


@pytest.fixture(scope="module")
async def ingress_url(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    unique = uuid.uuid4().hex[:10]
    log_dir = tmp_path_factory.mktemp("ingress-properties")
    settings = scoped_test_settings(services, unique)
    await create_topics(services.kafka_bootstrap_servers, topic_names(settings), partitions=2)
    # The tests below are synchronous (schemathesis calls over HTTP and waits), so everything
    # they reach runs outside this event loop: the simulator and the worker as processes, the
    # ingress in its own thread.
    sim_port = free_port()
    simulator = ChildProcess(
        "simulator",
        [sys.executable, "-m", "llmstream.cli", "simulate", "--port", str(sim_port)],
        Path(log_dir) / "simulator.log",
    ).start()
    simulator.wait_for_port(sim_port)
    env = worker_env(settings, f"http://127.0.0.1:{sim_port}", f"g-{unique}")
    worker = WorkerProcess(env, Path(log_dir)).start()
    ingress = IngressSettings(
        **settings.model_dump(),
        rate_limit_per_minute=0,
        chat_timeout_s=20,
        listener_fetch_max_wait_ms=50,
    )
    try:
        await worker.wait_ready()
        async with serve_app(create_app(ingress)) as url:
            yield url
    finally:
        worker.stop()
        simulator.stop()


@schema.parametrize()
@hypothesis_settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case, ingress_url: str) -> None:
    case.call_and_validate(base_url=ingress_url, checks=[not_a_server_error])
