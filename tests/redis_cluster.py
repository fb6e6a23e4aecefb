"""A local three-node Redis Cluster for tests, from the same ``redis-server`` the suite uses.

Three masters, no replicas, slots split in three, no persistence. Started once per session (about
a second or two); stopped, with its files, at the end.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from llmstream.core.record import AnyRedis
from llmstream.devtools.embedded import redis_server_binary
from llmstream.devtools.processes import ChildProcess, port_is_free
from tests.conftest import Services

_SLOTS = 16384
_NODES = 3


@dataclass(frozen=True)
class RedisClusterNodes:
    ports: list[int]
    started_in_s: float  # how long starting and forming the cluster took

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"


def _free_ports(count: int) -> list[int]:
    # A node also listens on its cluster bus, port + 10000 (redis 6 cannot choose it).
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 50000)
        if port not in ports and port_is_free(port) and port_is_free(port + 10000):
            ports.append(port)
    return ports


def _wait(what: str, ready: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if callable(ready) and ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test Redis Cluster did not get ready: {what}")
        time.sleep(0.05)


def _start(workdir: Path) -> tuple[list[ChildProcess], list[int]]:
    binary = redis_server_binary()
    ports = _free_ports(_NODES)
    nodes = [
        ChildProcess(
            f"redis-cluster-{port}",
            [
                binary,
                *("--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                *("--cluster-node-timeout", "5000", "--appendonly", "no", "--save", ""),
                *("--dir", str(workdir)),
            ],
            workdir / f"redis-{port}.log",
        ).start()
        for port in ports
    ]
    return nodes, ports


def _form(ports: list[int]) -> None:
    clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    try:
        for client in clients:
            _wait("a node answers", client.ping)
        bounds = [_SLOTS * i // _NODES for i in range(_NODES + 1)]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        for client in clients:
            _wait(
                "every node sees cluster_state:ok and all three nodes",
                lambda c=client: (
                    c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                    and int(c.execute_command("CLUSTER INFO").get("cluster_known_nodes")) == _NODES
                ),
            )
    finally:
        for client in clients:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """Three ``redis-server --cluster-enabled yes`` nodes forming one cluster."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmstream-cluster-") as workdir:
        processes, ports = _start(Path(workdir))
        try:
            _form(ports)
            yield RedisClusterNodes(ports, time.monotonic() - started)
        finally:
            for process in processes:
                process.stop()


@pytest.fixture(params=["single", "cluster"])
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[AnyRedis]:
    """A client of the session's single Redis, then of the Redis Cluster: a test using it runs
    once on each. A module using it imports ``redis_cluster`` too (the cluster run needs it)."""
    client: AnyRedis
    if request.param == "single":
        services: Services = request.getfixturevalue("services")
        client = aioredis.Redis.from_url(services.redis_url)
    else:
        nodes: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        client = await RedisCluster.from_url(nodes.url).initialize()
    try:
        yield client
    finally:
        await client.aclose()
