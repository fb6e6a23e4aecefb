"""How a worker is a member of its consumer group: the session it keeps and who it says it is.

A killed worker's partitions wait for its session to time out, and the rebalance that follows
stops every worker of the group; with static membership (``LLMSTREAM_GROUP_INSTANCE_ID``) a
restarted worker can come back as the member it was.
"""

from __future__ import annotations

from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.kafka_io import consumer_options
from llmstream.processors.settings import WorkerSettings
from tests.harness import produce_requests, provider_calls, read_answers, request, running_worker

# Apache Kafka refuses sessions shorter than group.min.session.timeout.ms (6 s by default).
KAFKA_MIN_SESSION_S = 6.0


def test_a_dead_worker_is_noticed_within_ten_seconds_on_any_kafka() -> None:
    settings = WorkerSettings()
    assert KAFKA_MIN_SESSION_S <= settings.session_timeout_s <= 10.0
    # Three heartbeats per session: one lost heartbeat does not cost the membership.
    assert settings.heartbeat_interval_s * 3 <= settings.session_timeout_s
    assert settings.group_instance_id is None  # dynamic membership unless told otherwise

    options = consumer_options(settings)
    assert options["session_timeout_ms"] == settings.session_timeout_s * 1000
    assert options["heartbeat_interval_ms"] == settings.heartbeat_interval_s * 1000
    assert "group_instance_id" not in options
    assert options["enable_auto_commit"] is False  # offsets pass only what is finished


async def group_member_ids(bootstrap: str, group: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        [description] = response.groups
        # (error_code, group, state, protocol_type, protocol, members); a member is
        # (member_id, client_id, client_host, metadata, assignment).
        return [member[0] for member in description[5]]
    finally:
        await admin.close()


async def test_a_worker_with_a_group_instance_id_joins_as_that_member_and_answers(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    group = f"{unique}-group"
    instance = f"{unique}-worker-0"
    async with running_worker(
        settings, simulator.url, group, tmp_path, LLMSTREAM_GROUP_INSTANCE_ID=instance
    ):
        # The broker names a static member after its instance ID (KIP-345: "<id>-<uuid>").
        members = await group_member_ids(settings.kafka_bootstrap_servers, group)
        assert len(members) == 1 and members[0].startswith(f"{instance}-"), members

        requests = [request(f"{unique}-{i}") for i in range(8)]
        await produce_requests(settings, requests)
        answers = await read_answers(settings, len(requests))
        assert {a.request_id for a in answers} == {r.request_id for r in requests}
    calls = await provider_calls(simulator)
    assert {rid: n for rid, n in calls.items() if rid.startswith(unique)} == {
        r.request_id: 1 for r in requests
    }
